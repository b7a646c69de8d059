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

Shapes: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); query positions `q_pos` (Tq,) in 0..Tk-1, shared by the batch.
This file imports only torch: it is copied into every exported model folder as the fallback path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["compress_keys", "num_compressed", "select_blocks", "block_sparse_attention", "infllm_v2_attention"]


def num_compressed(length: int, kernel: int = 32, stride: int = 16) -> int:
    """How many compressed keys `length` tokens produce (only complete windows count)."""
    return 0 if length < kernel else (length - kernel) // stride + 1


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


def select_blocks(
    q: torch.Tensor,
    ckeys: torch.Tensor,
    q_pos: torch.Tensor,
    num_kv_blocks: int,
    *,
    scale: float,
    block_size: int = 64,
    kernel: int = 32,
    stride: int = 16,
    topk: int = 96,
    init_blocks: int = 1,
    local_blocks: int = 32,
    dense_len: int = 8192,
    return_scores: bool = False,
):
    """Block selection. Returns a bool mask (B, Hkv, Tq, NB): True where query t reads block j."""
    B, Hq, Tq, D = q.shape
    Hkv, nc = ckeys.shape[1], ckeys.shape[2]
    group = Hq // Hkv
    device = q.device
    t = q_pos.view(-1, 1)
    # 2. Group scores over the visible compressed keys.
    if nc > 0:
        logits = (q.float() @ ckeys.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
        i = torch.arange(nc, device=device).view(1, -1)
        visible = stride * i + kernel - 1 <= t  # (Tq, Nc)
        logits = logits.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with nothing visible -> 0
        scores = probs.view(B, Hkv, group, Tq, nc).sum(2)  # (B, Hkv, Tq, Nc)
        # 3. Max over the compressed keys overlapping each block (invisible ones excluded).
        idx, valid = _overlap_table(num_kv_blocks, nc, block_size, kernel, stride, device)
        gathered = scores[..., idx.view(-1)].view(B, Hkv, Tq, num_kv_blocks, -1)
        ok = valid.view(1, num_kv_blocks, -1) & visible[:, idx.view(-1)].view(Tq, num_kv_blocks, -1)
        block_scores = gathered.masked_fill(~ok, float("-inf")).amax(-1)
    else:
        block_scores = q.new_full((B, Hkv, Tq, num_kv_blocks), float("-inf"), dtype=torch.float32)
    # 4. Forced and visible blocks, then top-k among the rest.
    j = torch.arange(num_kv_blocks, device=device).view(1, -1)
    own = torch.div(t, block_size, rounding_mode="floor")
    visible_blocks = j <= own
    forced = visible_blocks & ((j < init_blocks) | (j > own - local_blocks))
    dense_query = ((t + 1) < dense_len) | ((own + 1) <= topk)  # (Tq, 1)
    ranked = block_scores.masked_fill(forced, float("inf")).masked_fill(~visible_blocks, float("-inf"))
    k_eff = min(topk, num_kv_blocks)
    # Ties (common: neighbouring blocks share the compressed keys they overlap) go to the later block: a stable
    # descending sort over the blocks in reverse order.
    order = torch.sort(ranked.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k_eff]
    top = num_kv_blocks - 1 - order
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)
    mask = (chosen | forced | dense_query) & visible_blocks
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
    block_size: int = 64,
    kernel: int = 32,
    stride: int = 16,
    topk: int = 96,
    init_blocks: int = 1,
    local_blocks: int = 32,
    dense_len: int = 8192,
):
    """Dense causal attention while every query is short; the full InfLLM-V2 selection otherwise."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    Tk = k.shape[2]
    num_blocks = -(-Tk // block_size)
    group = q.shape[1] // k.shape[1]
    if Tk < dense_len or num_blocks <= topk:
        s = torch.arange(Tk, device=q.device)
        causal = s.view(1, -1) <= q_pos.view(-1, 1)
        kk = k.repeat_interleave(group, dim=1) if group > 1 else k
        vv = v.repeat_interleave(group, dim=1) if group > 1 else v
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal, scale=scale)
    if ckeys is None:
        ckeys = compress_keys(k, kernel, stride)
    mask = select_blocks(
        q, ckeys, q_pos, num_blocks, scale=scale, block_size=block_size, kernel=kernel, stride=stride,
        topk=topk, init_blocks=init_blocks, local_blocks=local_blocks, dense_len=dense_len,
    )
    return block_sparse_attention(q, k, v, q_pos, mask, scale=scale, block_size=block_size)
