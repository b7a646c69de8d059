"""Checkpoint readers: whatever the user has -> a config plus a stream of tensors under the family's transformers names.

Formats: a Hugging Face folder (safetensors, sharded or not, or pytorch_model*.bin) or a hub id found in the local
cache; a single .safetensors / .bin / .pt / .ckpt / .pth state dict (also wrapped: {"state_dict": ...}, Lightning
checkpoints, DDP "module." and torch.compile "_orig_mod." prefixes) with a config.json beside it or given; Meta's
consolidated.*.pth + params.json (meta_format.py); GGUF (dequantised by transformers, default_model.load_gguf).

Every reader gives the tensor specs (names, shapes, dtypes) without reading the data, so the converter can check and
plan the whole output first, then a stream that reads one tensor (or one shard) at a time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from . import meta_format
from .checkpoint import Checkpoint, load_pickle, read_config
from .errors import CorruptCheckpointError, MissingConfigError, SourceNotFoundError, WeightMismatchError
from .families import family_for
from .safetensors_io import SafetensorsReader, TensorSpec

PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
STATE_DICT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------
def open_checkpoint(source: str | os.PathLike | None, config: str | os.PathLike | None = None) -> Checkpoint:
    """Recognise the format of `source` (None: the built-in default model) and open it."""
    from .default_model import default_gguf_path

    if source is None:
        return open_gguf(default_gguf_path(), label="SmolLM2-135M-Instruct (built-in default, GGUF)")
    path = Path(source).expanduser()
    if not path.exists():
        if path.name == "params.json" and any(path.parent.glob("consolidated.*.pth")):
            return meta_format.open_meta(path.parent, config)  # says that params.json is missing
        text = str(source)
        if _HUB_ID.match(text) and not text.startswith("."):
            return open_hf_folder(hub_snapshot(text), config, source=text)
        raise SourceNotFoundError(f"{source} does not exist: give a model folder, a weights file or a cached hub id")
    if path.is_dir():
        if meta_format.is_meta_folder(path):
            return meta_format.open_meta(path, config)
        if any(path.glob("consolidated.*.pth")) and not (path / "config.json").is_file():
            return meta_format.open_meta(path, config)  # says that params.json is missing
        if (path / "config.json").is_file() or config is not None:
            return open_hf_folder(path, config, source=str(source))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return open_gguf(ggufs[0])
        raise SourceNotFoundError(
            f"{path} holds no model this tool reads: expected config.json with model.safetensors or pytorch_model.bin, "
            "params.json with consolidated.*.pth, or one .gguf file"
        )
    name = path.name.lower()
    if name.endswith(".gguf"):
        return open_gguf(path)
    if name == "params.json" or re.fullmatch(r"consolidated\.\d+\.pth", name):
        return meta_format.open_meta(path.parent, config)
    if name.endswith(STATE_DICT_SUFFIXES):
        return open_state_dict_file(path, config)
    raise SourceNotFoundError(
        f"{path}: unknown file type; give a .safetensors/.bin/.pt/.ckpt/.pth state dict, a .gguf file or a folder"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------
def _config_for(folder: Path, config: str | os.PathLike | None) -> tuple[Any, str]:
    chosen = Path(config) if config is not None else folder / "config.json"
    if not chosen.is_file():
        if config is None:
            raise MissingConfigError(f"no config.json beside {folder}: put the model's config.json there or pass --config")
        raise MissingConfigError(f"config file {chosen} does not exist")
    return read_config(chosen), str(chosen)


def _generation_config(folder: Path | None):
    if folder is None or not (folder / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face folders and hub ids
# ---------------------------------------------------------------------------------------------------------------------
def hub_snapshot(repo_id: str) -> Path:
    """The folder of a hub model already in the local cache. Never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        where = cache or "the Hugging Face cache"
        raise SourceNotFoundError(
            f"{repo_id} is not a local path and not in {where}: convert works offline, so download it first "
            f"(`hf download {repo_id}`) or give a local folder"
        ) from None


def open_hf_folder(folder: Path, config: str | os.PathLike | None = None, source: str | None = None) -> Checkpoint:
    folder = Path(folder)
    cfg, cfg_file = _config_for(folder, config)
    files, fmt = _weight_files(folder)
    if fmt == "hf-safetensors":
        readers = [SafetensorsReader(f) for f in files]
        specs: dict[str, TensorSpec] = {}
        for reader in readers:
            specs.update(reader.specs())

        def stream():
            for reader in readers:
                yield from reader.tensors()
    else:
        specs = {}
        for f in files:
            specs.update(_specs_of(load_pickle(f), f))

        def stream():
            for f in files:  # one shard at a time: its memory map is released before the next opens
                state = load_pickle(f)
                yield from ((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
                del state

    rename = _prefix_fixer(specs, folder)
    return Checkpoint(
        source=source or str(folder), format=fmt, config=cfg, config_file=cfg_file,
        specs=_renamed(specs.items(), rename, dict), stream=lambda: _renamed(stream(), rename, iter),
        folder=folder, generation_config=_generation_config(folder),
    )


def _weight_files(folder: Path) -> tuple[list[Path], str]:
    for index_name, fmt in (("model.safetensors.index.json", "hf-safetensors"), ("pytorch_model.bin.index.json", "hf-bin")):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CorruptCheckpointError(f"{index} is not a valid weights index: re-download it") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            absent = [f for f in files if not f.is_file()]
            if absent:
                raise WeightMismatchError(f"{index} lists {absent[0].name}, which is missing: re-download the model")
            return files, fmt
    for name, fmt in (("model.safetensors", "hf-safetensors"), ("pytorch_model.bin", "hf-bin")):
        if (folder / name).is_file():
            return [folder / name], fmt
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards, "hf-safetensors"
    raise SourceNotFoundError(f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin)")


# ---------------------------------------------------------------------------------------------------------------------
# Single state-dict files
# ---------------------------------------------------------------------------------------------------------------------
def open_state_dict_file(path: Path, config: str | os.PathLike | None = None) -> Checkpoint:
    cfg, cfg_file = _config_for(path.parent, config)
    if path.name.lower().endswith(".safetensors"):
        reader = SafetensorsReader(path)
        specs, stream = reader.specs(), reader.tensors
    else:
        state = _unwrap(load_pickle(path), path)
        specs = _specs_of(state, path)
        del state

        def stream():
            state = _unwrap(load_pickle(path), path)
            yield from ((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))

    rename = _prefix_fixer(specs, path)
    return Checkpoint(
        source=str(path), format="state-dict", config=cfg, config_file=cfg_file,
        specs=_renamed(specs.items(), rename, dict), stream=lambda: _renamed(stream(), rename, iter),
        folder=path.parent, generation_config=_generation_config(path.parent),
    )


def _unwrap(obj: dict, path: Path) -> dict:
    """The state dict inside common wrappers: {"state_dict": ...} (Lightning), {"model": ...}, {"module": ...}."""
    for _ in range(3):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CorruptCheckpointError(f"{path} holds no tensors (looked inside the keys {', '.join(WRAPPER_KEYS)})")


def _specs_of(state: dict, path: Path) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(v.shape), v.dtype, path) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _renamed(items, rename, into):
    return into((new, value) for new, value in ((rename(k), v) for k, v in items) if new is not None)


def _prefix_fixer(specs: dict[str, TensorSpec], where: Path) -> Callable[[str], str | None]:
    """Names as transformers saves them: strip wrapper prefixes ("model." of a Lightning module holding the HF model,
    "module." of DDP, "_orig_mod." of torch.compile; tensors outside the prefix, such as a Lightning module's other
    parts, are dropped) and add "model." to a bare base-model state dict."""
    anchor = next((k for k in specs if k.endswith("embed_tokens.weight")), None)
    if anchor is None:
        raise WeightMismatchError(
            f"{where} has no embedding tensor (*embed_tokens.weight): is it a Llama-family transformers state dict?"
        )
    base = anchor[: -len("embed_tokens.weight")]
    if base.endswith("model."):
        prefix = base[: -len("model.")]
        if not prefix:
            return lambda name: name
        return lambda name: name[len(prefix):] if name.startswith(prefix) else None
    if base == "":  # a bare LlamaModel-style state dict
        return lambda name: name if name.startswith("lm_head.") else "model." + name
    return lambda name: "model." + name[len(base):] if name.startswith(base) else None


# ---------------------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------------------
def open_gguf(path: Path, label: str | None = None) -> Checkpoint:
    """GGUF through transformers (dequantised in memory: GGUF files are quantised, so there is nothing to stream)."""
    from .default_model import load_gguf

    model, tokenizer = load_gguf(path)
    family_for(model.config.model_type, str(path))
    state = model.state_dict()
    specs = {k: TensorSpec(tuple(v.shape), v.dtype, path) for k, v in state.items()}
    return Checkpoint(
        source=label or str(path), format="gguf", config=model.config, config_file=str(path), specs=specs,
        stream=lambda: iter(model.state_dict().items()), folder=None, tokenizer=tokenizer,
        generation_config=model.generation_config, model=model,
    )
