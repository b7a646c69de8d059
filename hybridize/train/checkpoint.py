"""Checkpoints: written atomically (a temporary folder renamed into place), pruned to the last N.

Two kinds, both with `trainer_state.json` (stage, step, tokens, data position, scheduler, metrics):
- mid-stage: `accelerator.save_state` (model, optimizer, RNG of every process; sharded under FSDP);
- stage end: the full model weights (`model.safetensors`, LoRA merged) and nothing of the finished stage's optimizer.
"""

from __future__ import annotations

import json
import os
import shutil
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
