"""Open the models that eval and bench compare: a hybrid folder, a dense source, or a weightless shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SOURCE = "default"  # the built-in SmolLM2-135M (offline GGUF)


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any | None
    kind: str  # "hybrid" or "dense"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_kind(model) -> str:
    return "hybrid" if getattr(model.config, "model_type", None) == "hybridize" else "dense"


def load_model(spec: str, *, dtype=None, device=None) -> LoadedModel:
    """`spec`: a model folder or hub id (hybrid folders load with trust_remote_code), a `.gguf` file, or "default"
    for the built-in SmolLM2-135M. One-line errors for paths that do not exist."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..convert.default_model import load_default_model, load_gguf

    dtype = parse_dtype(dtype)
    device = pick_device(device)
    if spec == DEFAULT_SOURCE:
        model, tokenizer = load_default_model(dtype=dtype)
        name = "SmolLM2-135M"
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{spec} does not exist: give a .gguf file, a model folder or 'default'")
        model, tokenizer = load_gguf(spec, dtype=dtype)
        name = Path(spec).stem
    else:
        path = Path(spec)
        if not path.exists() and (spec.startswith((".", "/")) or spec.count("/") != 1):
            raise FileNotFoundError(f"{spec} does not exist: give a model folder, a hub id, a .gguf file or 'default'")
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec} has no config.json: is it a model folder?")
        kwargs = {"trust_remote_code": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=True)
        except (OSError, ValueError):
            tokenizer = None
        name = path.name if path.exists() else spec
    model.to(device).eval()
    return LoadedModel(name, model, tokenizer, model_kind(model))


__all__ = ["DTYPES", "DEFAULT_SOURCE", "LoadedModel", "load_model", "model_kind", "parse_dtype", "pick_device"]
