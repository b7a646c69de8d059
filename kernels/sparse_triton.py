"""InfLLM-V2 block-sparse attention in Triton: block selection, sparse attention forward/backward and decode.

Computes the function of `sparse_reference.py` (same arguments; that file is the spec):

1. `compress_keys_triton`: K1_i = mean(K[stride*i : stride*i + kernel]) in float32 (per document when packed).
2. Selection, two modes (option `selection`, both defined in sparse_reference.py):
   - "block": queries grouped by position, group = position // `select_tokens` (default 64 = one key block's worth of
     queries); the call's tokens of a group share one selection. Two launches, no score matrix per token:
     `_block_scores_kernel`, one program per (group, KV group) holding ALL the group's (head, token) query rows as one
     bf16 matrix: pass 1 keeps each row's softmax normaliser (log-sum-exp over K1, or over the coarse K2 with
     `coarse`), pass 2 runs transposed (keys x rows, bf16 tensor-core products, fp32 accumulation) so that the sum of
     the probabilities over the group's rows is a register-axis reduction; it writes one fp32 score per (group, K1
     key). Keys every row sees skip the causal mask; dense groups skip both passes. Then `_block_topk_kernel`, one
     program per (group, KV group): block max-pool over the overlapping K1 keys, forced init/local blocks, dense rule,
     exact top-k by bisection on the order-preserving integer image of the scores (ties: the later block), ascending
     block list. Groups are aligned to positions (one host read of q_pos[0], free when q_pos is a CPU tensor, as
     the model passes it without a cache); q_pos must be consecutive.
   - "token" (default): each query token has its own selection: `_select_scores_kernel` writes per-token group scores
     (two passes as above, fp32 rows x keys), then max-pool / top-k in PyTorch; the attention tiles walk the union of
     their tokens' selections and mask per token (a bitset per token).
   Option `coarse`: the score softmax's normaliser from K2 (`coarse_from_compressed`), InfLLM-V2's approximation.
3. `_attn_fwd_kernel` / `_attn_bwd_dq_kernel` / `_attn_bwd_dkdv_kernel`: flash-attention style kernels over a list of
   key blocks per row table entry (a "row": consecutive queries of one document sharing one list) and KV group. All
   query heads of a group are rows of one tile, so each K/V block is read once per group and tile. The leading list
   entries that every row of a tile sees whole run without a mask; causal mask inside the own block(s); fp32 softmax
   and accumulation, exp2 arithmetic. dk/dv use the transposed lists (for each key block, the rows that read it), so
   no atomics.
4. Packed documents (`cu_seqlens`, B == 1): row and key-block tables map every row and key block to its document
   (key offset, K1/K2 offsets, length), so compression, block selection and attention forward/backward handle all
   documents in the same launches; each document has its own positions, compressed keys, init/local blocks and block
   grid, and never sees another. Token mode runs one document at a time unless every document is dense. When every
   document is dense (distillation's packed 2K rows of documents shorter than `dense_len`), one flash varlen call
   (`torch.nn.attention.varlen.varlen_attn`, where this torch has it) takes the whole row instead: no compression,
   selection or host synchronisation.
5. A call whose queries are all its keys (prefill, training) runs its leading dense queries (those that keep every
   block: key length below `dense_len` or at most `topk` blocks, whole selection groups in block mode) as
   one flash SDPA call and only the later rows through 2-3; the function is the same.

Decode (`decode_attention_triton`, taken by `infllm_v2_attention_triton` for one query token without gradients): four
launches, no host synchronisation (CUDA-graph safe): (1) split-key logits of every head against K1 in float32 (3 tf32
tensor-core products) plus per-chunk softmax statistics (over K2 with `coarse`; without cached `coarse_keys`, K2 is
first derived from K1 by a few PyTorch ops); (2) one program per (sequence, KV group): normaliser, group-summed
probabilities, block max-pool, forced blocks and the bisection top-k; (3) split attention over the listed blocks;
(4) combine. Batch B >= 1 shares q_pos, like the reference. Speed: bench/results/kernels-sparse.md.
`tuning` (a dict, optional everywhere): tile sizes / warps / stages of the prefill kernels (see bench_sparse.py).
Options: one frozen `SparseOptions` (sparse_reference.py), passed as `options=` and/or its fields as keywords.

Files, by stage (flat, side by side in kernels/ and in every exported model folder): sparse_common.py (shared jit and
host helpers), sparse_compress.py (1), sparse_select.py (2, row tables, `Selection`), sparse_attention.py (3),
sparse_decode.py (decode); this file is the dispatcher (`infllm_v2_attention_triton`, `supports`) and re-exports the
public names. They import only torch and triton (triton inside try).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .sparse_attention import block_sparse_attention_triton
from .sparse_common import HAS_TRITON, _documents, _host_to_device
from .sparse_compress import coarse_from_compressed, compress_keys_triton
from .sparse_decode import decode_attention_triton, decode_select_triton
from .sparse_reference import SparseOptions
from .sparse_select import Selection, select_blocks_triton

try:  # flash attention over packed documents (torch >= 2.10 on CUDA); older torch keeps the block kernels
    import inspect

    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    # the causal switch was renamed between releases: a window of (-1, 0) keys is causal attention
    _VARLEN_CAUSAL = ({"window_size": (-1, 0)} if "window_size" in inspect.signature(_varlen_attn).parameters
                      else {"is_causal": True} if "is_causal" in inspect.signature(_varlen_attn).parameters else None)
except ImportError:
    _varlen_attn = _VARLEN_CAUSAL = None

__all__ = [
    "HAS_TRITON",
    "Selection",
    "SparseOptions",
    "compress_keys_triton",
    "coarse_from_compressed",
    "select_blocks_triton",
    "block_sparse_attention_triton",
    "decode_attention_triton",
    "decode_select_triton",
    "infllm_v2_attention_triton",
    "supports",
]


def supports(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, stride: int = 16) -> bool:
    """Whether the Triton path handles these shapes (otherwise callers use the reference)."""
    D = q.shape[-1]
    return (
        HAS_TRITON
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype
        and D in (16, 32, 64, 128, 256)
        and block_size >= 16
        and block_size & (block_size - 1) == 0
        and block_size % stride == 0
        and q.shape[1] % k.shape[1] == 0
    )


def _dense(q, k, v, q_pos, scale):
    """Dense causal attention (SDPA; flash with is_causal when every key is a query)."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if Tq == 1 and int(q_pos[-1]) == Tk - 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    s = torch.arange(Tk, device=q.device)
    causal = s.view(1, -1) <= q_pos.view(-1, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=gqa)


def _keeps_every_block(length: int, o: SparseOptions) -> bool:
    """Whether every query of a document of `length` tokens sees all its keys (dense below dense_len or with no more
    than topk blocks): true of the longest document is true of all."""
    return length < o.dense_len or -(-length // o.block_size) <= o.topk


def _dense_documents(q, k, v, cu_seqlens: torch.Tensor, longest: int, scale: float) -> torch.Tensor | None:
    """Causal attention inside each packed document (B == 1) in one flash varlen call, (1, H, T, D); None where
    this torch or dtype has no such call. The model's q, k, v are (T, H, D) in memory, so the transposes copy nothing;
    K/V heads are repeated for grouped queries (head h reads K/V head h // group, as SDPA's enable_gqa)."""
    if _VARLEN_CAUSAL is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    group = q.shape[1] // k.shape[1]
    qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
    if group > 1:
        kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    cu = _host_to_device(cu_seqlens, q.device)
    o = _varlen_attn(qt, kt, vt, cu, cu, longest, longest, scale=scale, **_VARLEN_CAUSAL)
    return o.transpose(0, 1)[None]


def _dense_prefix(Tq: int, Tk: int, o: SparseOptions) -> int:
    """How many leading rows of a call whose queries are every key (Tq == Tk, positions 0..Tk-1) are dense queries
    (key length below dense_len, or no more than topk blocks visible), cut down to whole selection groups in block
    mode so that every later group is the same as in one call (selection is aligned to positions); 0 otherwise."""
    if Tq != Tk:
        return 0
    n = min(Tk - 1, max(o.dense_len - 1, o.topk * o.block_size))
    if o.selection == "block":
        n -= n % o.select_tokens
    return n


def infllm_v2_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor | None,
    ckeys: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    options: SparseOptions | None = None,
    coarse_keys: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    tuning: dict | None = None,
    **fields,
) -> torch.Tensor:
    """`infllm_v2_attention` on the Triton kernels (dense SDPA while every query is short).
    `cu_seqlens`: packed documents (B == 1, queries = keys, q_pos ignored: positions restart at each document);
    block mode runs every document in the same launches, token mode once per document, one flash varlen call when
    every document is dense. A CPU `cu_seqlens` (the model passes one) lets the forward run without waiting for the
    GPU: the row tables are built on the host and copied asynchronously.
    `options` / `fields`: SparseOptions."""
    o = SparseOptions.of(options, **fields)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    Tk = k.shape[2]
    if cu_seqlens is not None:
        if q.shape[0] != 1 or q.shape[2] != Tk or ckeys is not None or coarse_keys is not None:
            raise ValueError("packed documents (cu_seqlens) need batch 1, as many queries as keys and no cached keys")
        cu_seqlens = cu_seqlens.detach().to("cpu", torch.int64)  # the kernels' tables are built on the host
        a, L = _documents(cu_seqlens, Tk)
        longest = int(L.max())
        all_dense = _keeps_every_block(longest, o)
        if all_dense:
            out = _dense_documents(q, k, v, cu_seqlens, longest, scale)
            if out is not None:
                return out
        if o.selection == "token" and not all_dense:  # per-token selection: one document at a time
            parts = []
            for s, n in zip(a.tolist(), L.tolist()):
                if n > 0:
                    parts.append(infllm_v2_attention_triton(
                        q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n], torch.arange(n, device=q.device),
                        scale=scale, options=o, tuning=tuning))
            return torch.cat(parts, 2)
        # Block mode (or only dense documents, where both modes keep every block): all documents in one set of
        # launches through the row tables.
        ck = compress_keys_triton(k.detach(), o.kernel, o.stride, cu_seqlens)
        sel = select_blocks_triton(q, ck, None, 0, scale=scale, options=replace(o, selection="block"),
                                   cu_seqlens=cu_seqlens, tuning=tuning)
        return block_sparse_attention_triton(q, k, v, None, sel, scale=scale, tuning=tuning)
    num_blocks = -(-Tk // o.block_size)
    if _keeps_every_block(Tk, o):
        return _dense(q, k, v, q_pos, scale)
    n = _dense_prefix(q.shape[2], Tk, o)
    if n:
        # The first rows keep every block anyway: flash attention runs them at about half the block kernels' time
        # (H200, 8K training: about 1 ms against 2.2 ms per layer backward); the sparse kernels take the rest.
        head = _dense(q[:, :, :n], k[:, :, :n], v[:, :, :n], None, scale)
        tail = infllm_v2_attention_triton(q[:, :, n:], k, v, q_pos[n:], ckeys, scale=scale, options=o,
                                          coarse_keys=coarse_keys, tuning=tuning)
        return torch.cat([head, tail], 2)
    if ckeys is None:
        ckeys = compress_keys_triton(k.detach(), o.kernel, o.stride)
    if q.shape[2] == 1 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Decode (one token: block mode is the same function): fused path, four launches.
        if q.stride(-1) != 1:
            q = q.contiguous()
        ck = ckeys if ckeys.stride(-1) == 1 else ckeys.contiguous()
        return decode_attention_triton(
            q, k if k.stride(-1) == 1 else k.contiguous(), v if v.stride(-1) == 1 else v.contiguous(),
            q_pos.to(q.device), ck, scale=scale, options=o, coarse_keys=coarse_keys)
    sel = select_blocks_triton(q, ckeys, q_pos, num_blocks, scale=scale, options=o, coarse_keys=coarse_keys,
                               tuning=tuning)
    return block_sparse_attention_triton(q, k, v, q_pos, sel, scale=scale, tuning=tuning)
