"""What every checkpoint reader shares: the Checkpoint record, the safe pickle loader, config.json parsing and the
check of tensors against the config. readers.py and meta_format.py both build on this module, never on each other's
internals."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import CorruptCheckpointError, MissingConfigError, UnsafeCheckpointError, WeightMismatchError
from .families import family_for
from .safetensors_io import TensorSpec

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old Llama checkpoints saved the RoPE table; it is recomputed


@dataclass
class Checkpoint:
    """A source model, not yet read: its config, tensor specs and a way to stream its tensors (transformers names)."""

    source: str  # what the user gave
    format: str  # "hf-safetensors", "hf-bin", "state-dict", "meta", "gguf"
    config: Any  # the family's transformers config
    config_file: str  # where the config came from, for messages
    specs: dict[str, TensorSpec]
    stream: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    folder: Path | None = None  # tokenizer / generation_config files live here
    tokenizer: Any = None  # in-memory tokenizer (GGUF)
    generation_config: Any = None  # in-memory generation config (GGUF)
    model: Any = None  # in-memory model (GGUF)
    notes: list[str] = field(default_factory=list)
    family: Any = None  # the family adapter, set by check_source
    checked: bool = False  # tensors checked against the config (check_weights): done once per checkpoint

    @property
    def num_parameters(self) -> int:
        return sum(spec.nbytes // torch.empty((), dtype=spec.dtype).element_size() for spec in self.specs.values())

    def tokenizer_files(self) -> list[Path]:
        if self.folder is None:
            return []
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike):
    """A transformers config of a supported family from a config.json; one-line errors for anything else."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_file():
        raise MissingConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MissingConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise MissingConfigError(f"{path} has no model_type: is it a transformers config.json?")
    model_type = data["model_type"]
    family_for(model_type, str(path))
    data = {k: v for k, v in data.items() if k not in ("model_type", "_name_or_path")}
    try:
        return AutoConfig.for_model(model_type, **data)
    except (TypeError, ValueError, KeyError) as e:
        raise MissingConfigError(f"{path} is not a valid config: {str(e).splitlines()[0]}") from None


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e).lower():
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file: no mmap


def load_pickle(path: Path) -> dict:
    """torch.load with weights_only=True (never arbitrary unpickling), memory-mapped when the file allows it."""
    try:
        with warnings.catch_warnings():
            # the legacy unpickler warns about the protocol of whatever bytes it is handed before failing on them
            warnings.filterwarnings("ignore", message=".*protocol.*")
            obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # random bytes also fail the weights-only unpickler (an unknown opcode), but name no class
            raise CorruptCheckpointError(
                f"{path} is not a readable PyTorch checkpoint (not a pickle of tensors): re-download or re-save it"
            ) from None
        raise UnsafeCheckpointError(
            f"{path} stores Python objects ({found.group(1)}) that only arbitrary unpickling could load; refusing it "
            "(that can run code): re-save just the state dict (torch.save(model.state_dict())) or use safetensors"
        ) from None
    # The legacy unpickler fails on arbitrary bytes with whatever its first misread opcode raises.
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError, struct.error) as e:
        readable = isinstance(e, (RuntimeError, OSError, ValueError)) and str(e)
        detail = str(e).splitlines()[0][:120] if readable else "not a pickle of tensors"
        raise CorruptCheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({detail}): re-download or re-save it"
        ) from None
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------
def ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


def check_weights(ckpt: Checkpoint) -> None:
    """Every tensor the config implies is present with its shape, and nothing else is: one-line errors otherwise."""
    from transformers import AutoModelForCausalLM

    if ckpt.checked:
        return

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(ckpt.config)
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    tied = bool(getattr(ckpt.config, "tie_word_embeddings", False))
    hint = "are the weights and the config from the same model?"
    missing = [n for n in expected if n not in ckpt.specs and not (tied and n == "lm_head.weight")]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightMismatchError(
            f"the weights in {ckpt.source} lack {missing[0]}{more}, which {ckpt.config_file} requires: {hint}"
        )
    for name, shape in expected.items():
        spec = ckpt.specs.get(name)
        if spec is not None and spec.shape != shape:
            where = spec.file or ckpt.source
            raise WeightMismatchError(
                f"{name} has shape {list(spec.shape)} in {where} but {ckpt.config_file} implies {list(shape)}: {hint}"
            )
    extra = [n for n in ckpt.specs if n not in expected and not ignored(n)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightMismatchError(
            f"the weights in {ckpt.source} hold {extra[0]}{more}, which {ckpt.config_file} does not describe: {hint}"
        )
    ckpt.checked = True
