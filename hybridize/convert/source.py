"""The one way every command opens a source model, so that convert, score, train and eval accept the same formats
(readers.py), work offline and fail with the same one-line errors.

`open_checked` gives the checkpoint with its family found and its tensors checked against its config (once);
`load_source_model` turns a checkpoint into a transformers model (reusing the in-memory GGUF model);
`open_source(spec, dtype)` does both and adds the tokenizer and a label.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..common import parse_dtype
from .checkpoint import Checkpoint, check_weights, ignored
from .families import family_for
from .readers import open_checkpoint

DEFAULT_SPEC = "default"  # the built-in SmolLM2-135M-Instruct (recipes and eval name it so; convert takes no SOURCE)


def check_source(ckpt: Checkpoint) -> Checkpoint:
    """Find the family, refuse what it cannot convert, add its notes and check the tensors; a second call is free."""
    if ckpt.family is None:
        family = family_for(getattr(ckpt.config, "model_type", None), ckpt.config_file)
        family.check(ckpt.config)
        ckpt.notes.extend(family.notes(ckpt.config))
        ckpt.family = family
    check_weights(ckpt)
    return ckpt


def open_checked(spec: str | os.PathLike | None, config: str | os.PathLike | None = None) -> Checkpoint:
    """`spec`: None or "default" (the built-in model, unless a path of that name exists), a folder, a weights file,
    a .gguf file or a hub id already in the local cache."""
    if spec is not None and str(spec) == DEFAULT_SPEC and not Path(DEFAULT_SPEC).exists():
        spec = None
    return check_source(open_checkpoint(spec, config))


def source_tokenizer(ckpt: Checkpoint):
    """The source's tokenizer, or None when it has none."""
    if ckpt.tokenizer is not None:
        return ckpt.tokenizer
    if ckpt.folder is None or not any(p.name.startswith("tokenizer") for p in ckpt.tokenizer_files()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt.folder, trust_remote_code=False)  # never a folder's own code


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def model_from_tensors(ckpt: Checkpoint, tensors, dtype: torch.dtype = torch.float32):
    """The source as a transformers causal LM built from (name, tensor) pairs of its stream."""
    from .default_model import model_from_state

    state = {name: cast_floating(t, dtype) for name, t in tensors if not ignored(name)}
    model = model_from_state(ckpt.config, state, dtype=dtype)
    if ckpt.generation_config is not None:
        model.generation_config = ckpt.generation_config
    return model


def load_source_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32):
    """The source as a transformers causal LM, read from the same stream as the conversion (checked first, so a
    mismatch is a one-line error here too)."""
    check_source(ckpt)
    if ckpt.model is not None:
        return ckpt.model.to(dtype)
    return model_from_tensors(ckpt, ckpt.stream(), dtype)


def open_source(spec: str | os.PathLike | None, dtype: str | torch.dtype = "float32", *,
                config: str | os.PathLike | None = None):
    """(model in eval mode, tokenizer or None, label) of any source `convert` accepts."""
    torch_dtype = parse_dtype(dtype)
    ckpt = open_checked(spec, config)
    return load_source_model(ckpt, torch_dtype).eval(), source_tokenizer(ckpt), ckpt.source


def require_tokenizer(tokenizer, label: str, why: str):
    """`tokenizer`, or a one-line error naming the source and what needs it."""
    if tokenizer is None:
        raise FileNotFoundError(f"{label} has no tokenizer files: {why}")
    return tokenizer
