"""InfLLM-V2 block-sparse attention in plain PyTorch: the reference for the Triton kernels.

For one query at position t (0-based, logical: padding removed) over keys 0..t:

1. Compressed keys: K1_i = mean(K[stride*i : stride*i + kernel]) (kernel 32, stride 16); key i is visible to t when
   its whole span lies at or before t.
2. Scores: softmax over the visible compressed keys of q K1^T * scale, per query head, summed over the query heads of
   one KV group (the group shares one selection).
3. Block score of 64-token block j: the max of those scores over the compressed keys that overlap block j (for the
   defaults: max-pool with kernel 5, stride 4, padding 1).
4. Selection: the init block(s) and the local window (the query's own block and the `local_blocks - 1` before it) are
   always kept; the rest of the `topk` budget goes to the highest-scoring earlier blocks (equal scores: the later
   block wins); nothing after the own block.
   Queries whose key length t + 1 is below `dense_len`, or that see no more than `topk` blocks, keep every block.
5. Attention: ordinary softmax attention of the query over the tokens of its selected blocks (causal in its own block).

Options (both off by default; the default is the exact per-token function above):
- `selection="block"`: the queries are grouped by absolute logical position, group = t // `select_tokens` (default 64 =
  block_size: a group is one key block's worth of queries, all with the same own block). The group's tokens (those
  of this call) share one selection: the group score of compressed key i is the sum over the group's tokens of each
  token's step-2 score (each token's softmax over the keys visible to IT, summed over the heads); block scores as in
  step 3 over the keys visible to the group's last token; forced blocks are the union over the group's tokens (init
  and local blocks of the own block(s)); every visible block if ANY token of the group is a dense query; top-k and the
  tie rule as in step 4. A token never reads a block after its own (per-token causal mask; attention stays exact).
  Groups are aligned to positions, so splitting the queries of one call into several calls at multiples of
  `select_tokens` changes nothing; a group cut by a split is shared only among its tokens of each call (decode,
  one token per call, is therefore per-token selection).
- `coarse=True`: the softmax normaliser of step 2 comes from the coarse keys K2 (kernel `coarse_kernel` 128, stride
  `coarse_stride` 64; K2_c = mean of the coarse_kernel/kernel non-overlapping K1 windows that tile it, which equals
  compress_keys(k, 128, 64)) instead of K1: score_i = exp(q K1_i^T * scale - lse), lse = logsumexp over the K2 keys
  visible to the token (0 when none is), summed over the heads. InfLLM-V2's speed trick; an approximation of step 2.

Shapes: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); query positions `q_pos` (Tq,) in 0..Tk-1, shared by the batch.
Packed documents: `infllm_v2_attention(..., cu_seqlens=...)` runs each document alone (positions from 0).
The twelve options travel as one frozen `SparseOptions` (defined here, taken by both backends): every function takes
`options=` and/or the fields as keywords (`SparseOptions.of`).
This file imports only torch: it is copied into every exported model folder as the fallback path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = [
    "SparseOptions",
    "compress_keys",
    "coarse_compressed_keys",
    "num_compressed",
    "num_coarse",
    "select_blocks",
    "block_sparse_attention",
    "infllm_v2_attention",
]


@dataclass(frozen=True)
class SparseOptions:
    """The options of InfLLM-V2 attention (see the module docstring), shared by this reference and the Triton side."""

    block_size: int = 64
    kernel: int = 32
    stride: int = 16
    topk: int = 96
    init_blocks: int = 1
    local_blocks: int = 32
    dense_len: int = 8192
    selection: str = "token"
    select_tokens: int = 64
    coarse: bool = False
    coarse_kernel: int = 128
    coarse_stride: int = 64

    @classmethod
    def of(cls, options: SparseOptions | None = None, **fields) -> SparseOptions:
        """`options` (None: the defaults) with `fields` replaced: how the functions read `options=` and keywords."""
        if options is None:
            return cls(**fields)
        return replace(options, **fields) if fields else options


def num_compressed(length: int, kernel: int = 32, stride: int = 16) -> int:
    """How many compressed keys `length` tokens produce (only complete windows count)."""
    return 0 if length < kernel else (length - kernel) // stride + 1


def num_coarse(num_ckeys: int, kernel: int = 32, stride: int = 16, coarse_kernel: int = 128,
               coarse_stride: int = 64) -> int:
    """How many coarse keys K2 `num_ckeys` compressed keys K1 produce (see coarse_compressed_keys)."""
    span, step = (coarse_kernel // kernel - 1) * (kernel // stride), coarse_stride // stride
    return 0 if num_ckeys <= span else (num_ckeys - 1 - span) // step + 1


def compress_keys(k: torch.Tensor, kernel: int = 32, stride: int = 16) -> torch.Tensor:
    """Mean-pool keys over windows: (B, H, T, D) -> (B, H, Nc, D), in float32."""
    n = num_compressed(k.shape[2], kernel, stride)
    if n == 0:
        return k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3], dtype=torch.float32)
    windows = k.float().unfold(2, kernel, stride)  # (B, H, Nc, D, kernel)
    return windows.mean(-1)[:, :, :n]


def _overlap_table(num_blocks: int, nc: int, block_size: int, kernel: int, stride: int, device):
    """For each block j, the compressed keys i whose window [stride*i, stride*i + kernel) overlaps it.

    Returns an index table (NB, W) and a validity mask of the same shape.
    """
    j = torch.arange(num_blocks, device=device)
    lo = torch.div(j * block_size - kernel, stride, rounding_mode="floor") + 1  # first i with stride*i+kernel > 64j
    lo = lo.clamp(min=0)
    hi = torch.div((j + 1) * block_size - 1, stride, rounding_mode="floor")  # last i with stride*i < 64(j+1)
    width = (block_size + kernel - 2) // stride + 1
    idx = lo.view(-1, 1) + torch.arange(width, device=device).view(1, -1)
    valid = (idx <= hi.view(-1, 1)) & (idx < nc)
    return idx.clamp(max=max(nc - 1, 0)), valid


def coarse_compressed_keys(ckeys: torch.Tensor, kernel: int = 32, stride: int = 16, coarse_kernel: int = 128,
                           coarse_stride: int = 64) -> torch.Tensor:
    """Coarse keys K2 from K1: the mean of the coarse_kernel/kernel non-overlapping K1 windows that tile each coarse
    window [coarse_stride*c, coarse_stride*c + coarse_kernel). (B, H, Nc, D) -> (B, H, N2, D) float32."""
    if coarse_kernel % kernel or coarse_stride % stride or kernel % stride:
        raise ValueError("coarse_kernel must be a multiple of kernel, coarse_stride of stride and kernel of stride")
    B, H, nc, D = ckeys.shape
    per = coarse_kernel // kernel
    span, step = (per - 1) * (kernel // stride), coarse_stride // stride  # K1 index span of one K2 window, K2 step
    n2 = num_coarse(nc, kernel, stride, coarse_kernel, coarse_stride)
    if n2 == 0:
        return ckeys.new_zeros(B, H, 0, D, dtype=torch.float32)
    first = torch.arange(n2, device=ckeys.device) * step
    idx = first.view(-1, 1) + torch.arange(per, device=ckeys.device).view(1, -1) * (kernel // stride)
    return ckeys.float()[:, :, idx.view(-1)].view(B, H, n2, per, D).mean(3)


def _coarse_lse(q, ckeys, t, scale, group, kernel, stride, coarse_kernel, coarse_stride, coarse_keys):
    """Per query head and token: logsumexp of q K2^T * scale over the K2 keys visible to the token (0 if none)."""
    if coarse_keys is None:
        coarse_keys = coarse_compressed_keys(ckeys, kernel, stride, coarse_kernel, coarse_stride)
    n2 = coarse_keys.shape[2]
    if n2 == 0:
        return q.new_zeros(q.shape[:-1] + (1,), dtype=torch.float32)
    logits2 = (q.float() @ coarse_keys.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    c = torch.arange(n2, device=q.device).view(1, -1)
    visible2 = coarse_stride * c + coarse_kernel - 1 <= t
    lse = torch.logsumexp(logits2.masked_fill(~visible2, float("-inf")), dim=-1, keepdim=True)
    return torch.where(visible2.any(-1, keepdim=True), lse, torch.zeros_like(lse))


def _group_scores(q, ckeys, q_pos, scale, kernel, stride, coarse, coarse_kernel, coarse_stride, coarse_keys):
    """Step 2: per token, softmax over its visible compressed keys summed over the heads of each KV group.
    Returns scores (B, Hkv, Tq, Nc) (0 where invisible) and the visibility (Tq, Nc)."""
    B, Hq, Tq, D = q.shape
    Hkv, nc = ckeys.shape[1], ckeys.shape[2]
    group = Hq // Hkv
    t = q_pos.view(-1, 1)
    logits = (q.float() @ ckeys.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    i = torch.arange(nc, device=q.device).view(1, -1)
    visible = stride * i + kernel - 1 <= t  # (Tq, Nc)
    if coarse:
        lse = _coarse_lse(q, ckeys, t, scale, group, kernel, stride, coarse_kernel, coarse_stride, coarse_keys)
        probs = torch.where(visible, torch.exp(logits - lse), torch.zeros_like(logits))
    else:
        logits = logits.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with nothing visible -> 0
    return probs.view(B, Hkv, group, Tq, nc).sum(2), visible


def _pool(scores, visible, num_kv_blocks, block_size, kernel, stride):
    """Step 3: max over the visible compressed keys overlapping each block. scores (B, Hkv, R, Nc), visible (R, Nc)."""
    B, Hkv, R, nc = scores.shape
    idx, valid = _overlap_table(num_kv_blocks, nc, block_size, kernel, stride, scores.device)
    gathered = scores[..., idx.view(-1)].view(B, Hkv, R, num_kv_blocks, -1)
    ok = valid.view(1, num_kv_blocks, -1) & visible[:, idx.view(-1)].view(R, num_kv_blocks, -1)
    return gathered.masked_fill(~ok, float("-inf")).amax(-1)


def _top_later_first(ranked, k):
    """Indices of the k highest scores along the last dim. Ties (common: neighbouring blocks share the compressed keys
    they overlap) go to the later block: a stable descending sort over the blocks in reverse order."""
    order = torch.sort(ranked.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
    return ranked.shape[-1] - 1 - order


def _choose(block_scores, t_lo, t_hi, options: SparseOptions, top=_top_later_first):
    """Step 4 for rows whose tokens span positions t_lo..t_hi ((R,) or (R, 1)): forced blocks of every token, top-k,
    dense. `top(ranked, k)`: the k highest, ties to the later block (the Triton side passes a faster equal one)."""
    o = options
    num_kv_blocks = block_scores.shape[-1]
    j = torch.arange(num_kv_blocks, device=block_scores.device).view(1, -1)
    t_lo, t_hi = t_lo.view(-1, 1), t_hi.view(-1, 1)
    own_lo = torch.div(t_lo, o.block_size, rounding_mode="floor")
    own_hi = torch.div(t_hi, o.block_size, rounding_mode="floor")
    visible_blocks = j <= own_hi
    forced = visible_blocks & ((j < o.init_blocks) | (j > own_lo - o.local_blocks))
    dense_query = ((t_lo + 1) < o.dense_len) | ((own_lo + 1) <= o.topk)
    ranked = block_scores.masked_fill(forced, float("inf")).masked_fill(~visible_blocks, float("-inf"))
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top(ranked, min(o.topk, num_kv_blocks)), True)
    return (chosen | forced | dense_query) & visible_blocks


def select_blocks(
    q: torch.Tensor,
    ckeys: torch.Tensor,
    q_pos: torch.Tensor,
    num_kv_blocks: int,
    *,
    scale: float,
    options: SparseOptions | None = None,
    coarse_keys: torch.Tensor | None = None,
    return_scores: bool = False,
    **fields,
):
    """Block selection. Returns a bool mask (B, Hkv, Tq, NB): True where query t reads block j.
    `return_scores` also returns the block scores: (B, Hkv, Tq, NB) per token, (B, Hkv, groups, NB) in block mode.
    `options` / `fields`: see SparseOptions."""
    o = SparseOptions.of(options, **fields)
    block_size, kernel, stride = o.block_size, o.kernel, o.stride
    selection, select_tokens = o.selection, o.select_tokens
    coarse, coarse_kernel, coarse_stride = o.coarse, o.coarse_kernel, o.coarse_stride
    if selection not in ("token", "block"):
        raise ValueError(f"selection must be 'token' or 'block', got {selection!r}")
    if select_tokens < 1:
        raise ValueError(f"select_tokens must be positive, got {select_tokens}")
    B, Hq, Tq, D = q.shape
    Hkv, nc = ckeys.shape[1], ckeys.shape[2]
    device = q.device
    t = q_pos.view(-1, 1)
    if selection == "token":
        # 2.-3. Group scores over the visible compressed keys, max over the keys overlapping each block.
        if nc > 0:
            scores, visible = _group_scores(q, ckeys, q_pos, scale, kernel, stride, coarse, coarse_kernel,
                                            coarse_stride, coarse_keys)
            block_scores = _pool(scores, visible, num_kv_blocks, block_size, kernel, stride)
        else:
            block_scores = q.new_full((B, Hkv, Tq, num_kv_blocks), float("-inf"), dtype=torch.float32)
        # 4. Forced and visible blocks, then top-k among the rest.
        mask = _choose(block_scores, t, t, o)
    else:
        # Groups by absolute position; the call's tokens of one group share the selection.
        gid = torch.div(q_pos, select_tokens, rounding_mode="floor")
        gidx = gid - gid.min()
        ng = int(gidx.max()) + 1
        t_lo = torch.full((ng,), 1 << 62, dtype=torch.long, device=device).scatter_reduce(
            0, gidx, q_pos.long(), "amin")
        t_hi = torch.full((ng,), -1, dtype=torch.long, device=device).scatter_reduce(0, gidx, q_pos.long(), "amax")
        if nc > 0:
            scores, _ = _group_scores(q, ckeys, q_pos, scale, kernel, stride, coarse, coarse_kernel, coarse_stride,
                                      coarse_keys)
            group_scores = scores.new_zeros(B, Hkv, ng, nc).index_add_(2, gidx, scores)
            i = torch.arange(nc, device=device).view(1, -1)
            group_visible = stride * i + kernel - 1 <= t_hi.view(-1, 1)  # visible to the group's last token
            block_scores = _pool(group_scores, group_visible, num_kv_blocks, block_size, kernel, stride)
        else:
            block_scores = q.new_full((B, Hkv, ng, num_kv_blocks), float("-inf"), dtype=torch.float32)
        group_mask = _choose(block_scores, t_lo.view(-1, 1), t_hi.view(-1, 1), o)
        j = torch.arange(num_kv_blocks, device=device).view(1, -1)
        own = torch.div(t, block_size, rounding_mode="floor")
        mask = group_mask[:, :, gidx] & (j <= own)  # never a block after the token's own
    if return_scores:
        return mask, block_scores
    return mask


def block_sparse_attention(q, k, v, q_pos, block_mask, *, scale: float, block_size: int = 64):
    """Softmax attention of each query over the tokens of its selected blocks, causal. Output (B, Hq, Tq, D)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    s = torch.arange(Tk, device=q.device)
    token_mask = block_mask[..., torch.div(s, block_size, rounding_mode="floor")]  # (B, Hkv, Tq, Tk)
    token_mask = token_mask & (s.view(1, -1) <= q_pos.view(-1, 1))
    token_mask = token_mask.repeat_interleave(group, dim=1)
    kk = k.repeat_interleave(group, dim=1)
    vv = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=token_mask, scale=scale)


def infllm_v2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    ckeys: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    options: SparseOptions | None = None,
    coarse_keys: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **fields,
):
    """Dense causal attention while every query is short; the full InfLLM-V2 selection otherwise.
    `cu_seqlens` (packed documents: B == 1, queries = keys, q_pos ignored): each document on its own, positions,
    compressed keys and blocks restarting at its first token; documents never see each other.
    `options` / `fields`: see SparseOptions."""
    o = SparseOptions.of(options, **fields)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        if q.shape[0] != 1 or q.shape[2] != k.shape[2] or ckeys is not None or coarse_keys is not None:
            raise ValueError("packed documents (cu_seqlens) need batch 1, as many queries as keys and no cached keys")
        bounds = [int(x) for x in cu_seqlens]
        parts = [infllm_v2_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], torch.arange(b - a, device=q.device),
                                     scale=scale, options=o) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(parts, 2) if parts else q.new_zeros(q.shape)
    Tk = k.shape[2]
    num_blocks = -(-Tk // o.block_size)
    group = q.shape[1] // k.shape[1]
    if Tk < o.dense_len or num_blocks <= o.topk:
        s = torch.arange(Tk, device=q.device)
        causal = s.view(1, -1) <= q_pos.view(-1, 1)
        kk = k.repeat_interleave(group, dim=1) if group > 1 else k
        vv = v.repeat_interleave(group, dim=1) if group > 1 else v
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal, scale=scale)
    if ckeys is None:
        ckeys = compress_keys(k, o.kernel, o.stride)
    mask = select_blocks(q, ckeys, q_pos, num_blocks, scale=scale, options=o, coarse_keys=coarse_keys)
    return block_sparse_attention(q, k, v, q_pos, mask, scale=scale, block_size=o.block_size)
