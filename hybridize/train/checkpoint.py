"""Checkpoints: written atomically (a temporary folder renamed into place), pruned to the last N.

Two kinds, both with `trainer_state.json` (stage, step, tokens, data position, scheduler, metrics):
- mid-stage: `accelerator.save_state` (model, optimizer, RNG of every process; sharded under FSDP);
- stage end: the full model weights (`model.safetensors`, LoRA merged) and nothing of the finished stage's optimizer.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"


def checkpoint_dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


def list_checkpoints(output: Path) -> list[Path]:
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output: Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


class CheckpointError(ValueError):
    """A checkpoint whose files are incomplete or unreadable (a crash or a full disk while it was copied)."""


# What the trainer reads back from trainer_state.json to continue a run.
STATE_KEYS = ("stage", "step", "stage_done", "global_step", "tokens", "metrics", "stages")


def check_checkpoint(path: Path) -> dict:
    """The state of a checkpoint whose files are complete; CheckpointError saying what is wrong otherwise.
    Cheap: headers and sizes of the weight files, the zip directory of torch.save files (a cut-off file has none),
    not their contents."""
    from ..convert.errors import CorruptCheckpointError
    from ..convert.safetensors_io import SafetensorsReader

    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path / STATE_FILE} is not readable JSON") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE} is not a mapping")
    missing = [k for k in STATE_KEYS + (() if state.get("stage_done") else ("scheduler",)) if k not in state]
    if missing:
        raise CheckpointError(f"{path / STATE_FILE} lacks {', '.join(missing)}")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != STATE_FILE)
    if state["stage_done"] and not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    # save_state's model file: model.safetensors, FSDP's sharded .distcp files, DeepSpeed's *_model_states.pt
    if not state["stage_done"] and not any(f.suffix in (".safetensors", ".bin", ".pt", ".distcp") for f in files):
        raise CheckpointError(f"{path} holds no model weights")
    for f in files:
        try:
            if f.suffix == ".safetensors":
                SafetensorsReader(f)
            elif f.suffix in (".bin", ".pkl", ".pt", ".pth"):
                with open(f, "rb") as fh:
                    magic = fh.read(4)
                if not magic:
                    raise zipfile.BadZipFile(f)
                if magic == b"PK\x03\x04":  # torch.save's zip format (a plain pickle cannot be checked cheaply)
                    zipfile.ZipFile(f).close()
        except (CorruptCheckpointError, zipfile.BadZipFile, OSError, EOFError) as e:
            reason = str(e).splitlines()[0] if isinstance(e, CorruptCheckpointError) else "cut off or damaged"
            raise CheckpointError(f"{f} is unreadable ({reason.removeprefix(str(f)).strip()})") from None
    return state


def usable_checkpoint(output: Path) -> tuple[Path | None, dict | None, list[str]]:
    """(checkpoint, its state, notes): the newest checkpoint whose files are complete, falling back to an older one
    kept by keep_last when the newest is damaged; (None, None, []) when there is none; CheckpointError when none is
    usable."""
    found = list_checkpoints(output)
    problems = []
    for path in reversed(found):
        try:
            state = check_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        notes = [f"{problems[0]}: resuming from the older {path}" + (f" ({len(problems)} newer checkpoints skipped)"
                                                                     if len(problems) > 1 else "")] if problems else []
        return path, state, notes
    if found:
        raise CheckpointError(f"cannot resume: {problems[0]}, and no older checkpoint in {checkpoint_dir(output)} is "
                              "usable: start again without --resume in a new output.dir")
    return None, None, []


def save_checkpoint(accelerator, output: Path, state: dict, *, model=None, full_state_dict=None, keep_last: int = 2) -> Path:
    """Every process calls this. Mid-stage: pass nothing (uses accelerator.save_state). Stage end: pass
    `full_state_dict` (on the main process; None elsewhere)."""
    root = checkpoint_dir(output)
    name = f"checkpoint-{state['global_step']:07d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if full_state_dict is None:
        accelerator.save_state(str(tmp), safe_serialization=True)
    elif accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.detach().to("cpu").contiguous() for k, v in full_state_dict.items()}, str(tmp / WEIGHTS_FILE))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor] | None:
    """The complete weights (main process; gathered under FSDP), tied copies dropped."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process or state is None:
        return None
    unwrapped = accelerator.unwrap_model(model)
    if getattr(unwrapped.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
