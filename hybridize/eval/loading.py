"""Open the models that eval and bench compare: a hybrid folder, a dense source, or a weightless shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..common import DTYPES, parse_dtype

DEFAULT_SOURCE = "default"  # the built-in SmolLM2-135M (offline GGUF)


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any | None
    kind: str  # "hybrid" or "dense"


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except (RuntimeError, ValueError):
        picked = None
    if picked is None or picked.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if picked.type == "cuda" and (picked.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return picked


def model_kind(model) -> str:
    return "hybrid" if getattr(model.config, "model_type", None) == "hybridize" else "dense"


def load_model(spec: str, *, dtype=None, device=None, trust_remote_code: bool = False) -> LoadedModel:
    """`spec`: a hybrid folder, "default" (the built-in SmolLM2-135M) or any source `hybridize convert` reads, offline
    (convert.source.open_source: same formats, same errors). Hybrids load with the installed hybridize classes; a
    folder's own Python files run only with `trust_remote_code` (the --trust-remote-code flag)."""
    from ..convert.source import open_source

    dtype = parse_dtype(dtype)
    device = pick_device(device)
    folder_code = trust_remote_code and spec != DEFAULT_SOURCE and not spec.endswith(".gguf")
    if folder_code or _is_hybrid(spec):
        path = Path(spec)
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec} has no config.json: is it a model folder?")
        model, tokenizer = _load_pretrained(spec, dtype, trust_remote_code)
    else:
        model, tokenizer, _ = open_source(spec, dtype or torch.float32)
    model.to(device).eval()
    return LoadedModel(_display_name(spec), model, tokenizer, model_kind(model))


def _display_name(spec: str) -> str:
    if spec == DEFAULT_SOURCE:
        return "SmolLM2-135M"
    path = Path(spec)
    if spec.endswith(".gguf"):
        return path.stem
    return path.name if path.exists() else spec


def _is_hybrid(spec: str) -> bool:
    """Whether `spec` is a folder (or a cached hub model) written by `hybridize convert`."""
    import json

    from ..convert.errors import SourceNotFoundError
    from ..convert.readers import hub_snapshot

    folder = Path(spec)
    if not folder.exists():
        if spec.startswith((".", "/")) or spec.count("/") != 1:
            return False
        try:
            folder = hub_snapshot(spec)
        except SourceNotFoundError:
            return False
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "hybridize"
    except (OSError, ValueError, AttributeError):
        return False


def _load_pretrained(spec: str, dtype: torch.dtype | None, trust_remote_code: bool):
    """(model, tokenizer or None) of a folder or hub id. A hybrid's auto_map is ignored: its folder's copy of the
    modeling files may have been changed by anyone who handled the folder."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    from ..arch import HybridForCausalLM, register_auto_classes
    from ..convert.errors import CorruptCheckpointError

    register_auto_classes()  # so that AutoTokenizer reads a hybrid's config without its folder's code
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        config, _ = PretrainedConfig.get_config_dict(spec)
        if config.get("model_type") == "hybridize":
            model = HybridForCausalLM.from_pretrained(spec, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code, **kwargs)
    except (SafetensorError, EOFError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CorruptCheckpointError(f"the weights of {spec} cannot be read ({first}): is a file truncated? "
                                     "re-download or re-convert it") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


__all__ = ["DTYPES", "DEFAULT_SOURCE", "LoadedModel", "load_model", "model_kind", "parse_dtype", "pick_device"]
