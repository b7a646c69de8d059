"""The one dispatch point between the model and its attention kernels.

Plain-PyTorch references always exist; Triton kernels are used for CUDA tensors when they import. In an exported
model folder every file sits side by side (relative imports); inside the hybridize package the kernels live in
`hybridize.kernels`. Both are tried, so the same file works in both places.
"""

from __future__ import annotations

import torch

try:  # exported model folder
    from .lightning_reference import lightning_attn_chunked, lightning_attn_recurrent
    from .sparse_reference import (SparseOptions, coarse_compressed_keys, compress_keys, infllm_v2_attention,
                                   num_coarse, num_compressed)
    from .window_reference import window_attention as window_attention_sdpa
    from .window_reference import window_attention_at, window_slots
except ImportError:  # the hybridize package
    from hybridize.kernels.lightning_reference import lightning_attn_chunked, lightning_attn_recurrent
    from hybridize.kernels.sparse_reference import (SparseOptions, coarse_compressed_keys, compress_keys,
                                                    infllm_v2_attention, num_coarse, num_compressed)
    from hybridize.kernels.window_reference import window_attention as window_attention_sdpa
    from hybridize.kernels.window_reference import window_attention_at, window_slots

try:  # Lightning Triton kernels (HAS_TRITON is False where triton is missing)
    from .lightning_triton import HAS_TRITON as _LIGHTNING_TRITON
    from .lightning_triton import lightning_attn_chunked_triton, lightning_attn_recurrent_triton
except ImportError:
    try:
        from hybridize.kernels.lightning_triton import HAS_TRITON as _LIGHTNING_TRITON
        from hybridize.kernels.lightning_triton import lightning_attn_chunked_triton, lightning_attn_recurrent_triton
    except ImportError:
        _LIGHTNING_TRITON = False

try:  # InfLLM-V2 sparse Triton kernels (HAS_TRITON is False where triton is missing)
    from .sparse_triton import HAS_TRITON as _SPARSE_TRITON
    from .sparse_triton import infllm_v2_attention_triton, supports as _sparse_supports
except ImportError:
    try:
        from hybridize.kernels.sparse_triton import HAS_TRITON as _SPARSE_TRITON
        from hybridize.kernels.sparse_triton import infllm_v2_attention_triton, supports as _sparse_supports
    except ImportError:
        _SPARSE_TRITON = False

try:  # fused output RMSNorm + sigmoid gate of the Lightning layers (the file also holds its PyTorch reference)
    from .norm_gate_triton import HAS_TRITON as _NORM_GATE_TRITON
    from .norm_gate_triton import rmsnorm_gate_reference, rmsnorm_gate_triton
except ImportError:
    from hybridize.kernels.norm_gate_triton import HAS_TRITON as _NORM_GATE_TRITON
    from hybridize.kernels.norm_gate_triton import rmsnorm_gate_reference, rmsnorm_gate_triton

try:  # fused per-head RMSNorm + RoPE of the Lightning layers' queries and keys (the file also holds its reference)
    from .norm_rope_triton import HAS_TRITON as _NORM_ROPE_TRITON
    from .norm_rope_triton import norm_rope_reference, norm_rope_triton
except ImportError:
    from hybridize.kernels.norm_rope_triton import HAS_TRITON as _NORM_ROPE_TRITON
    from hybridize.kernels.norm_rope_triton import norm_rope_reference, norm_rope_triton

try:  # the Lightning layers' window branch (sliding window + sinks) in Triton
    from .window_triton import HAS_TRITON as _WINDOW_TRITON
    from .window_triton import window_attention_triton
except ImportError:
    from hybridize.kernels.window_triton import HAS_TRITON as _WINDOW_TRITON
    from hybridize.kernels.window_triton import window_attention_triton

__all__ = ["lightning_attention", "sparse_attention", "output_norm_gate", "norm_rope", "compress_keys",
           "coarse_compressed_keys", "num_coarse", "num_compressed", "window_attention", "window_attention_at",
           "window_slots"]

# Below this many new tokens with a carried state, the recurrence is cheaper than the chunked form.
_RECURRENT_MAX_TOKENS = 16


def lightning_attention(q, k, v, log_decay, *, scale, initial_state=None, output_final_state=False,
                        chunk_size=64, cu_seqlens=None):
    """Decayed linear attention. q, k, v (B, H, T, D); returns (o, final_state or None).
    CUDA tensors go to the Triton kernels (which use their own block size); anything else to the PyTorch reference."""
    if _LIGHTNING_TRITON and q.is_cuda:
        decoding = initial_state is not None and q.shape[2] <= _RECURRENT_MAX_TOKENS and cu_seqlens is None
        if decoding and not (torch.is_grad_enabled() and any(
                t.requires_grad for t in (q, k, v, initial_state))):
            return lightning_attn_recurrent_triton(q, k, v, log_decay, scale, initial_state, output_final_state)
        return lightning_attn_chunked_triton(q, k, v, log_decay, scale, initial_state, output_final_state, 64,
                                             cu_seqlens)
    if initial_state is not None and q.shape[2] <= _RECURRENT_MAX_TOKENS and cu_seqlens is None:
        return lightning_attn_recurrent(q, k, v, log_decay, scale, initial_state, output_final_state)
    return lightning_attn_chunked(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size,
                                  cu_seqlens)


def sparse_attention(q, k, v, q_pos, ckeys=None, *, options=None, **kwargs):
    """InfLLM-V2 attention for one logical (unpadded) sequence batch; dense below `dense_len`.
    CUDA tensors go to the Triton kernels, anything else to the PyTorch reference; both take the same options
    (`SparseOptions` as `options=` and/or its fields as keywords: `selection="token"|"block"`, `select_tokens`,
    `coarse`, ... : see sparse_reference.py) and compute the same function. A single query token on CUDA (decode)
    takes the fused four-launch decode path. `cu_seqlens=` (packed documents, B == 1, q_pos None): every document on
    its own, in one call (a CPU `cu_seqlens`, or a CPU `q_pos` without cached keys, spares the kernels a host
    synchronisation). Other keywords (`scale`, `coarse_keys`, `cu_seqlens`) pass through."""
    fields = {name: kwargs.pop(name) for name in SparseOptions.__dataclass_fields__ if name in kwargs}
    o = SparseOptions.of(options, **fields)
    if _SPARSE_TRITON and q.is_cuda and _sparse_supports(q, k, block_size=o.block_size, stride=o.stride):
        return infllm_v2_attention_triton(q, k, v, q_pos, ckeys, options=o, **kwargs)
    if q_pos is not None and q_pos.device != q.device:  # the kernels take host positions; the reference does not
        q_pos = q_pos.to(q.device)
    return infllm_v2_attention(q, k, v, q_pos, ckeys, options=o, **kwargs)


def output_norm_gate(o, z, weight, eps):
    """RMSNorm of `o` over its last dimension times `weight`, then `sigmoid(z) *` when a gate input `z` is given
    (docs/design.md §3.1: y = sigmoid(W_z x) * RMSNorm(o)). CUDA tensors go to the fused Triton kernel (one read of o
    and z, one write), anything else to its PyTorch reference (the same arithmetic, float32 statistics)."""
    if _NORM_GATE_TRITON and o.is_cuda:
        return rmsnorm_gate_triton(o, None if z is None else z.to(o.dtype), weight, eps)
    return rmsnorm_gate_reference(o, z, weight, eps)


def window_attention(q, k, v, window, sinks=0, scale=None, *, cu_seqlens=None, starts=None, far=None):
    """Softmax attention over each sequence's first `sinks` and last `window` keys (kernels/window_reference.py is
    the spec). CUDA tensors without a gradient to take (prefill, decode, evaluation) go to the Triton kernel (the band
    in flash-attention tiles, no mask tensor), anything else to the blocked SDPA form: on an H200 the kernel's forward
    took 0.72-0.92x the SDPA form's time, its forward + backward 4.5-8.2x (bench/results/training.md, 2026-12-03)."""
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if _WINDOW_TRITON and q.is_cuda and not training:
        return window_attention_triton(q, k, v, window, sinks, scale, cu_seqlens=cu_seqlens, starts=starts, far=far)
    return window_attention_sdpa(q, k, v, window, sinks, scale, cu_seqlens=cu_seqlens, starts=starts, far=far)


def norm_rope(x, weight, eps, cos, sin, out_dtype):
    """Per-head RMSNorm of x (B, T, H, D) times `weight`, RoPE with cos/sin (B or 1, T, D) when given, as (B, H, T, D)
    in `out_dtype`. CUDA tensors go to the fused Triton kernel (one read of x, one write, training included), anything
    else to its PyTorch reference (the model's norm, transpose and rotation, the same arithmetic)."""
    if _NORM_ROPE_TRITON and x.is_cuda:
        return norm_rope_triton(x, weight, eps, cos, sin, out_dtype)
    return norm_rope_reference(x, weight, eps, cos, sin, out_dtype)
