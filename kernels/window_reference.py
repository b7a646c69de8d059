"""Softmax attention over a sliding window plus the first tokens of the sequence (attention sinks), in plain PyTorch.

The building block of a Lightning layer with a local softmax branch (bench/results/open.md, "a softmax window in the
linear layers"): query i reads key j when j <= i and (i - j < window or j < sinks). Measured on SmolLM2 (CPU, no
training), cutting the 22 layers that a 1:3 conversion makes linear to 256 + 4 such keys kept the held-out perplexity
within 1.04x of the source's (bench/results/retention.md).

`window_attention_reference` builds the whole (T, T) mask: the definition, for tests. `window_attention` does the same
work in O(T (2W + S)): queries in blocks of `window`, each against the sinks, the block before it and its own block,
one batched SDPA call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """K/V heads shared by groups of query heads (GQA) repeated to one per query head."""
    group = q.shape[1] // k.shape[1]
    if group * k.shape[1] != q.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return k, v


def _check(window: int, sinks: int) -> None:
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if not 0 <= sinks <= window:
        raise ValueError(f"sinks must be between 0 and the window ({window}), got {sinks}")


def window_mask(tq: int, tk: int, window: int, sinks: int = 0, device=None) -> torch.Tensor:
    """(tq, tk) bool, True where a query reads a key: the queries are the last tq of the tk positions."""
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


def window_attention_reference(q, k, v, window: int, sinks: int = 0, scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D); the whole mask, O(T^2)."""
    _check(window, sinks)
    k, v = expand_heads(q, k, v)
    T = q.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, T, window, sinks, q.device), scale=scale)


def window_attention(q, k, v, window: int, sinks: int = 0, scale: float | None = None, *, cu_seqlens=None,
                     starts=None) -> torch.Tensor:
    """The same as window_attention_reference, in blocks of `window` queries: O(T (2 window + sinks)) work.

    `cu_seqlens` (B == 1, host offsets of packed documents): each document on its own, with its own sinks.
    `starts` (host, one per row): left padding; row b's sequence begins at starts[b], its sinks are its first tokens
    and its padded queries get zeros."""
    _check(window, sinks)
    if cu_seqlens is not None or starts is not None:
        return _in_pieces(q, k, v, window, sinks, scale, cu_seqlens, starts)
    k, v = expand_heads(q, k, v)
    B, H, T, D = q.shape
    W = window
    nb = -(-T // W)
    pad = nb * W - T

    def blocks(x):  # (B, H, T, D) -> (B, H, nb, W, D), zero-padded at the end
        return F.pad(x, (0, 0, 0, pad)).view(B, H, nb, W, D)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    # each block's keys: the sinks, the block before it (zeros before the first), its own block
    prev_k = torch.cat([kb.new_zeros(B, H, 1, W, D), kb[:, :, :-1]], dim=2)
    prev_v = torch.cat([vb.new_zeros(B, H, 1, W, D), vb[:, :, :-1]], dim=2)
    parts_k, parts_v = [prev_k, kb], [prev_v, vb]
    if sinks:
        sink_k = k[:, :, :sinks].unsqueeze(2).expand(B, H, nb, sinks, D)
        sink_v = v[:, :, :sinks].unsqueeze(2).expand(B, H, nb, sinks, D)
        parts_k.insert(0, sink_k)
        parts_v.insert(0, sink_v)
    keys, values = torch.cat(parts_k, dim=3), torch.cat(parts_v, dim=3)
    # positions: query i = b W + r; window keys p = (b - 1) W + c; sink keys p = s
    b = torch.arange(nb, device=q.device)[:, None, None]
    i = b * W + torch.arange(W, device=q.device)[None, :, None]
    p = (b - 1) * W + torch.arange(2 * W, device=q.device)[None, None, :]
    # padded keys (p >= T) are zeros that only padded queries (i >= T) can reach: no row is ever empty
    in_window = (p >= 0) & (p <= i) & ((i - p < W) | (p < sinks))
    mask = in_window
    if sinks:
        # the first two blocks hold the sinks in their window part already: there the copies stay masked
        s = torch.arange(sinks, device=q.device)[None, None, :]
        mask = torch.cat([((b >= 2) & (s <= i)).expand(nb, W, sinks), in_window], dim=2)
    out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(B, H, nb * W, D)[:, :, :T]


def _in_pieces(q, k, v, window, sinks, scale, cu_seqlens, starts) -> torch.Tensor:
    """Packed documents or left-padded rows, one piece at a time (host offsets: no synchronisation)."""
    out = q.new_zeros(q.shape)
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"packed documents (cu_seqlens) come in one row, got {q.shape[0]}")
        cu = [int(x) for x in cu_seqlens]
        pieces = [(0, a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]
    else:
        pieces = [(row, int(a), q.shape[2]) for row, a in enumerate(starts) if int(a) < q.shape[2]]
    for row, a, b in pieces:
        part = (slice(row, row + 1), slice(None), slice(a, b))
        out[part] = window_attention(q[part], k[part], v[part], window, sinks, scale)
    return out
