"""Perplexity on text: non-overlapping windows of `seq_len` tokens, each run through the model in chunks (with the
cache carried between chunks), so long windows cost no more memory than one chunk."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..common import shakespeare_files
from .prefill import DEFAULT_CHUNK, prefill

BUILTIN_TEXTS = ("shakespeare", "news", "wiki", "pydoc")


@dataclass
class PerplexityResult:
    source: str
    seq_len: int
    windows: int
    tokens: int  # predicted tokens
    nll: float  # mean negative log-likelihood (nats/token)
    perplexity: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(source: str, max_chars: int | None = None) -> str:
    """Text of `source`: a file, a folder of .txt files, "shakespeare" (built in), a held-out source of heldout.py
    ("news", "wiki", "pydoc"), or "hf:NAME[:CONFIG[:SPLIT]]" (needs the `datasets` package; the "text" column)."""
    from .heldout import HELDOUT_SOURCES, read_documents

    if source in HELDOUT_SOURCES:
        text = "\n\n".join(read_documents(source, max_chars=max_chars))
        return text[:max_chars] if max_chars is not None else text
    if source == "shakespeare":
        files = shakespeare_files()
        return _join(files, max_chars, encoding="latin-1")
    if source.startswith("hf:"):
        return _dataset_text(source[3:], max_chars)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{source} holds no .txt files")
        return _join(files, max_chars)
    if not path.is_file():
        raise FileNotFoundError(f"{source} does not exist: give a text file, a folder of .txt files, 'shakespeare', "
                                f"'news', 'wiki', 'pydoc' or hf:NAME[:CONFIG[:SPLIT]]")
    return _join([path], max_chars)


def _join(files, max_chars, encoding="utf-8") -> str:
    parts, total = [], 0
    for f in files:
        text = f.read_text(encoding=encoding, errors="replace")
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n\n".join(parts)
    return text[:max_chars] if max_chars is not None else text


def _dataset_text(spec: str, max_chars) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: text sources need the `datasets` package (pip install datasets)") from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    ds = datasets.load_dataset(name, config, split=split or "test")
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name} has no 'text' column (columns: {ds.column_names})")
    parts, total = [], 0
    for row in ds:
        parts.append(row["text"])
        total += len(row["text"])
        if max_chars is not None and total >= max_chars:
            break
    return "\n".join(parts)


@torch.no_grad()
def window_nll(model, window: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> tuple[float, int]:
    """Summed NLL and count of the next-token predictions inside one window (1, T)."""
    T = window.shape[1]
    total = torch.zeros((), dtype=torch.float64)

    def on_chunk(logits, start, stop):
        nonlocal total
        stop_pred = min(stop, T - 1)  # the window's last position has nothing to predict
        if stop_pred <= start:
            return
        lg = logits[0, : stop_pred - start].float()
        tgt = window[0, start + 1 : stop_pred + 1].to(lg.device)
        total += F.cross_entropy(lg, tgt, reduction="sum").double().cpu()

    prefill(model, window, chunk_size, on_chunk=on_chunk)
    return float(total), T - 1


def perplexity_of_ids(
    model,
    ids: torch.Tensor,
    seq_len: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    max_windows: int | None = None,
    source: str = "",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `model` over the 1-D token tensor `ids` cut into non-overlapping windows of `seq_len`."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    windows = range(n)
    if progress:
        from tqdm.auto import tqdm

        windows = tqdm(windows, desc="perplexity", leave=False)
    for w in windows:
        window = ids[w * seq_len : (w + 1) * seq_len].view(1, -1).to(device)
        s, c = window_nll(model, window, chunk_size)
        total += s
        count += c
    nll = total / count
    return PerplexityResult(source, seq_len, n, count, nll, math.exp(nll))


@dataclass
class PositionResult:
    """Mean NLL of the predictions made at each position bucket [edges[i], edges[i+1]) of long windows: a model that
    uses its context well keeps lowering it with position; one that loses the context flattens or rises."""
    source: str
    window_len: int
    windows: int
    edges: list[int]
    nll: list[float | None]  # None for a bucket with no prediction
    tokens: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def position_edges(length: int, first: int = 512) -> list[int]:
    """Bucket edges 0, first, 2*first, 4*first, ... up to `length` (always the last edge)."""
    if length < 2 or first < 1:
        raise ValueError(f"need length >= 2 and first >= 1, got {length}, {first}")
    edges, e = [0], first
    while e < length:
        edges.append(e)
        e *= 2
    return edges + [length]


@torch.no_grad()
def position_nll(model, ids: torch.Tensor, window_len: int, edges: list[int] | None = None, *,
                 max_windows: int | None = None, chunk_size: int = DEFAULT_CHUNK, source: str = "") -> PositionResult:
    """NLL by position: non-overlapping windows of `window_len` tokens of the 1-D `ids`, each prediction (of the
    token at t+1, made at position t) summed into its position's bucket."""
    edges = edges or position_edges(window_len)
    n = ids.numel() // window_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window_len}")
    n = min(n, max_windows) if max_windows is not None else n
    device = next(model.parameters()).device
    bounds = torch.tensor(edges[1:-1], dtype=torch.long)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.long)
    for w in range(n):
        window = ids[w * window_len : (w + 1) * window_len].view(1, -1).to(device)

        def on_chunk(logits, start, stop):
            stop_pred = min(stop, window_len - 1)
            if stop_pred <= start:
                return
            lg = logits[0, : stop_pred - start].float()
            nll = F.cross_entropy(lg, window[0, start + 1 : stop_pred + 1], reduction="none").double().cpu()
            bucket = torch.bucketize(torch.arange(start, stop_pred), bounds, right=True)
            sums.index_add_(0, bucket, nll)
            counts.index_add_(0, bucket, torch.ones_like(bucket))

        prefill(model, window, chunk_size, on_chunk=on_chunk)
    means = [float(s / c) if c else None for s, c in zip(sums.tolist(), counts.tolist())]
    return PositionResult(source, window_len, n, list(edges), means, counts.tolist())


def perplexity(model, tokenizer, source: str, seq_len: int = 512, *, max_windows: int | None = 8,
               chunk_size: int = DEFAULT_CHUNK, progress: bool = False) -> PerplexityResult:
    """Read `source` (see read_text), tokenize it with `tokenizer`, and measure perplexity."""
    if tokenizer is None:
        raise ValueError("perplexity needs a tokenizer: the model folder has none")
    chars = None if max_windows is None else max_windows * seq_len * 8 + 1000  # enough text, not the whole corpus
    text = read_text(source, chars)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return perplexity_of_ids(model, ids, seq_len, chunk_size=chunk_size, max_windows=max_windows, source=source,
                             progress=progress)


__all__ = [
    "PerplexityResult", "PositionResult", "perplexity", "perplexity_of_ids", "position_edges", "position_nll",
    "read_text", "window_nll",
]
