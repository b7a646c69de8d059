"""Softmax attention over a sliding window plus the first tokens of the sequence (attention sinks), in plain PyTorch.

The building block of a Lightning layer with a local softmax branch (bench/results/open.md, "a softmax window in the
linear layers"): query i reads key j when j <= i and (i - j < window or j < sinks). Measured on SmolLM2 (CPU, no
training), cutting the 22 layers that a 1:3 conversion makes linear to 256 + 4 such keys kept the held-out perplexity
within 1.04x of the source's (bench/results/retention.md).

`window_attention_reference` builds the whole (T, T) mask: the definition, for tests. `window_attention` does the same
work in O(T (2W + S)): queries in blocks of `window`, each against the sinks, the block before it and its own block,
one batched SDPA call, packed documents and left-padded rows included. `window_attention_at` takes keys at given
positions (what a generation cache holds); `window_slots` says which of them such a cache keeps.

`far = (reach, q_far, k_far)` (every form): a sink read from more than `reach` positions back is scored q_far . k_far
instead of q . k. With RoPE, q_far rotated at position `reach` and k_far at position 0 score it as if it lay `reach`
back: the sinks are never read from further than the distance the source was trained on (its context), so the
function is the source's up to there and stays in its range beyond (StreamingLLM reads its sinks at cache positions
for the same reason).
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


def _check(window: int, sinks: int, far=None) -> None:
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if not 0 <= sinks <= window:
        raise ValueError(f"sinks must be between 0 and the window ({window}), got {sinks}")
    if far is not None and far[0] < 2 * window:
        # the blocked form reads sinks that lie in a block's window part (2 windows) with the near scoring
        raise ValueError(f"the sinks' reach ({far[0]}) must be at least twice the window ({window})")


def _attend_far(q, k, v, far, far_read: torch.Tensor, allowed: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Softmax attention written out, k and v expanded to q's heads: logits q . k, or q_far . k_far where `far_read`
    is True, over the keys `allowed` reads (both broadcast to (B, H, Tq, Tk)); at least float32."""
    _, qf, kf = far
    kf = kf.repeat_interleave(q.shape[1] // kf.shape[1], dim=1)
    dt = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    near = q.to(dt) @ k.to(dt).transpose(-1, -2)
    logits = torch.where(far_read, qf.to(dt) @ kf.to(dt).transpose(-1, -2), near) * scale
    return (torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1) @ v.to(dt)).to(q.dtype)


def window_mask(tq: int, tk: int, window: int, sinks: int = 0, device=None) -> torch.Tensor:
    """(tq, tk) bool, True where a query reads a key: the queries are the last tq of the tk positions."""
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


def window_attention_reference(q, k, v, window: int, sinks: int = 0, scale: float | None = None,
                               far=None) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D); the whole mask, O(T^2). `far`: the module's."""
    _check(window, sinks, far)
    k, v = expand_heads(q, k, v)
    T = q.shape[2]
    mask = window_mask(T, T, window, sinks, q.device)
    if far is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    i, j = torch.arange(T, device=q.device)[:, None], torch.arange(T, device=q.device)[None, :]
    return _attend_far(q, k, v, far, (j < sinks) & (i - j > far[0]), mask, scale)


def sequence_begin(B: int, T: int, device, *, cu_seqlens=None, starts=None) -> torch.Tensor:
    """(B or 1, T) long: where each token's sequence begins. `cu_seqlens` (B == 1): packed documents; `starts` (one
    per row): left padding, whose tokens count as one more sequence beginning at 0."""
    t = torch.arange(T, device=device)
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed documents (cu_seqlens) come in one row, got {B}")
        cu = torch.as_tensor(cu_seqlens, device=device).long()
        return cu[torch.searchsorted(cu, t, right=True) - 1][None]
    if starts is not None:
        st = torch.as_tensor(starts, device=device).long().view(B, 1)
        return torch.where(t[None] >= st, st, 0)
    return torch.zeros(1, T, dtype=torch.long, device=device)


def window_attention(q, k, v, window: int, sinks: int = 0, scale: float | None = None, *, cu_seqlens=None,
                     starts=None, far=None) -> torch.Tensor:
    """The same as window_attention_reference, in blocks of `window` queries: O(T (2 window + sinks)) work.

    `cu_seqlens` (B == 1, offsets of packed documents): each document on its own, with its own sinks.
    `starts` (one per row): left padding; row b's sequence begins at starts[b], its sinks are its first tokens and its
    padded queries get zeros. Either may live on the host or the device: nothing here waits for the GPU.
    `far` (the module's): where a row is long enough for a sink to lie beyond the reach, queries and keys carry both
    scorings side by side ([q, q_far] against [k, 0] or [0, k_far]), each sink twice, each copy masked where the other
    applies: one SDPA call still, at twice the width."""
    _check(window, sinks, far)
    k, v = expand_heads(q, k, v)
    B, H, T, D = q.shape
    W, dev = window, q.device
    split = far is not None and sinks > 0 and T - 1 > far[0]
    if split:
        scale = D ** -0.5 if scale is None else scale
        qf = far[1]
        kf = far[2].repeat_interleave(H // far[2].shape[1], dim=1)
        zeros = torch.zeros_like(k)
        q, k, kf, v = (torch.cat(x, dim=-1) for x in ((q, qf), (k, zeros), (zeros, kf), (v, torch.zeros_like(v))))
    E = q.shape[-1]
    nb = -(-T // W)
    pad = nb * W - T
    t = torch.arange(T, device=dev)
    st = None if starts is None else torch.as_tensor(starts, device=dev).long().view(B, 1)
    begin = sequence_begin(B, T, dev, cu_seqlens=cu_seqlens, starts=starts)

    def blocks(x):  # (B, H, T, E) -> (B * nb, H, W, E), zero-padded at the end: four dimensions for SDPA's kernels
        return F.pad(x, (0, 0, 0, pad)).view(B, H, nb, W, E).transpose(1, 2).reshape(B * nb, H, W, E)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    # each block's keys: the sinks of the sequence its window part starts in, the block before it, its own block
    first = B * nb

    def previous(xb):
        x = xb.view(B, nb, H, W, E)
        return torch.cat([x.new_zeros(B, 1, H, W, E), x[:, :-1]], dim=1).reshape(first, H, W, E)

    parts_k, parts_v = [previous(kb), kb], [previous(vb), vb]
    blk = torch.arange(nb, device=dev)
    i = blk[:, None, None] * W + torch.arange(W, device=dev)[None, :, None]  # (nb, W, 1) query positions
    p = (blk[:, None, None] - 1) * W + torch.arange(2 * W, device=dev)[None, None, :]  # (nb, 1, 2W) key positions
    begin = begin.expand(B, T)
    begin_pad = F.pad(begin, (0, nb * W + W - T), value=-1)  # padded positions belong to no sequence
    bq = begin_pad[:, i.squeeze(-1)][..., None]  # (B, nb, W, 1)
    bk = begin_pad[:, p.clamp(min=0).squeeze(1)][:, :, None, :]  # (B, nb, 1, 2W)
    # a key is read from its own sequence, causally, within the window or among that sequence's first `sinks`
    mask = (p >= 0) & (p <= i) & (bk == bq) & ((i - p < W) | (p - bq < sinks))
    if sinks:
        # the sinks of the sequence holding the window part's first key, where they lie before it (else they are
        # in the window part already and the copies stay masked)
        lead = begin_pad[:, (blk - 1).clamp(min=0) * W]  # (B, nb)
        sp = lead[..., None] + torch.arange(sinks, device=dev)  # (B, nb, S)
        spc = sp.clamp(max=T - 1)
        gather = lambda x: x.gather(2, spc.view(B, 1, nb * sinks, 1).expand(B, H, -1, E)).view(
            B, H, nb, sinks, E).transpose(1, 2).reshape(first, H, sinks, E)
        window_start = ((blk - 1) * W)[None, :, None]
        bs = begin_pad.gather(1, spc.view(B, -1)).view(B, nb, 1, sinks)
        smask = ((sp < window_start)[:, :, None, :] & (bs == bq) & (sp < T)[:, :, None, :]).expand(B, nb, W, sinks)
        smasks = [smask]
        parts_k.insert(0, gather(k))
        parts_v.insert(0, gather(v))
        if split:  # the far copies after the near ones, each read where the other is not
            beyond = (i[None] - sp[:, :, None, :]) > far[0]  # (B, nb, W, S)
            smasks = [smask & ~beyond, smask & beyond]
            parts_k.insert(1, gather(kf))
            parts_v.insert(1, gather(v))
        mask = torch.cat([*smasks, mask.expand(B, nb, W, 2 * W)], dim=3)
    extra = -mask.shape[-1] % 16  # keys to a multiple of 16, masked: SDPA's memory-efficient kernel takes the mask as is
    if extra:
        parts_k.append(kb.new_zeros(first, H, extra, E))
        parts_v.append(vb.new_zeros(first, H, extra, E))
        mask = F.pad(mask, (0, extra), value=False)
    keys, values = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)
    # every query reads itself (positions past T too: theirs is a zero key of sequence -1), so no row is empty
    out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=mask.reshape(first, 1, W, -1), scale=scale)
    out = out.view(B, nb, H, W, E).transpose(1, 2).reshape(B, H, nb * W, E)[:, :, :T, :D]
    if st is not None:
        out = out.masked_fill((t[None] < st)[:, None, :, None], 0.0)
    return out


def window_attention_at(q, k, v, q_pos, k_pos, window: int, sinks: int = 0, scale: float | None = None,
                        far=None) -> torch.Tensor:
    """The same rule over keys at arbitrary positions: what a cache holds (the sinks, a ring of recent keys) followed
    by the new ones. q (B, H, Tq, D), k and v (B, Hkv, Tk, D), q_pos (B, Tq) and k_pos (B, Tk) each row's own token
    positions, negative for padding or an empty slot. A query reads key j when 0 <= pos_j <= pos_i and (pos_i - pos_j
    < window or pos_j < sinks); each position must appear at most once among the keys. Padded queries get zeros.
    `far` (the module's; k_far laid out like k, read at the sinks' slots only): the few keys' logits written out."""
    _check(window, sinks, far)
    k, v = expand_heads(q, k, v)
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp) & ((qp - kp < window) | (kp < sinks))
    empty = ~mask.any(-1, keepdim=True)  # padded queries: read anything, then zeroed (an all-masked row gives NaN)
    if far is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask | empty)[:, None], scale=scale)
    else:
        out = _attend_far(q, k, v, far, ((kp < sinks) & (qp - kp > far[0]))[:, None], (mask | empty)[:, None], scale)
    return out.masked_fill(empty[:, None], 0.0)


def window_slots(pos: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Where each key of `pos` (B, N) stays in a cache of `sinks + window` slots, or `sinks + window` (dropped): the
    sinks in the first slots, the last `window` positions of each row in a ring after them (slot sinks + pos mod
    window). Kept positions never share a slot."""
    last = pos.max(dim=1, keepdim=True).values
    ring = sinks + torch.remainder(pos, window)
    slot = torch.where(pos < sinks, pos, ring)
    keep = (pos >= 0) & ((pos < sinks) | (pos > last - window))
    return torch.where(keep, slot, torch.full_like(slot, sinks + window))
