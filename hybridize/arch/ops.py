"""The one dispatch point between the model and its attention kernels.

Plain-PyTorch references always exist; Triton kernels are used for CUDA tensors when they import. In an exported
model folder every file sits side by side (relative imports); inside the hybridize package the kernels live in
`hybridize.kernels`. Both are tried, so the same file works in both places.
"""

from __future__ import annotations

import torch

try:  # exported model folder
    from .lightning_reference import lightning_attn_chunked, lightning_attn_recurrent
    from .sparse_reference import compress_keys, infllm_v2_attention, num_compressed
except ImportError:  # the hybridize package
    from hybridize.kernels.lightning_reference import lightning_attn_chunked, lightning_attn_recurrent
    from hybridize.kernels.sparse_reference import compress_keys, infllm_v2_attention, num_compressed

__all__ = ["lightning_attention", "sparse_attention", "compress_keys", "num_compressed"]

# Below this many new tokens with a carried state, the recurrence is cheaper than the chunked form.
_RECURRENT_MAX_TOKENS = 16


def lightning_attention(q, k, v, log_decay, *, scale, initial_state=None, output_final_state=False,
                        chunk_size=64, cu_seqlens=None):
    """Decayed linear attention. q, k, v (B, H, T, D); returns (o, final_state or None)."""
    if initial_state is not None and q.shape[2] <= _RECURRENT_MAX_TOKENS and cu_seqlens is None:
        return lightning_attn_recurrent(q, k, v, log_decay, scale, initial_state, output_final_state)
    return lightning_attn_chunked(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size,
                                  cu_seqlens)


def sparse_attention(q, k, v, q_pos, ckeys=None, **options):
    """InfLLM-V2 attention for one logical (unpadded) sequence batch; dense below `dense_len`."""
    return infllm_v2_attention(q, k, v, q_pos, ckeys, **options)


def is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"
