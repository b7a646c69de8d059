"""InfLLM-V2 sparse Triton kernels: what every stage shares (jit helpers, host helpers). See sparse_triton.py.

This file imports only torch and triton (triton inside try).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False
    triton = tl = None  # the other kernel files take triton from here

_LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            r = tl.dot(a, b, input_precision="ieee")
        else:
            r = tl.dot(a, b)
        return r

    @triton.jit
    def _dot_f32(a, b, IEEE: tl.constexpr):
        # float32 operands at float32 accuracy: exact FMA in the interpreter, 3 tf32 tensor-core products on the GPU.
        if IEEE:
            r = tl.dot(a, b, input_precision="ieee")
        else:
            r = tl.dot(a, b, input_precision="tf32x3")
        return r

    @triton.jit
    def _lse_step(s2, m, l):
        """Fold base-2 scores s2 (rows x keys, -inf where hidden) into the running row max m and sum l."""
        m_new = tl.maximum(m, tl.max(s2, 1))
        return m_new, l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), 1)

    @triton.jit
    def _attend_step(s2, v, m, l, acc, IEEE: tl.constexpr):
        """One online-softmax step: fold base-2 scores s2 of a key tile and its values v into (m, l, acc)."""
        m_new = tl.maximum(m, tl.max(s2, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s2 - m_new[:, None])
        return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _count(length, kernel: int, stride: int):
    """Complete windows of `kernel` at step `stride` in `length` tokens (int or CPU int64 tensor)."""
    if isinstance(length, torch.Tensor):
        return torch.where(length >= kernel, torch.div(length - kernel, stride, rounding_mode="floor") + 1, 0)
    return 0 if length < kernel else (length - kernel) // stride + 1


def _host_to_device(t: torch.Tensor, device, dtype=torch.int32) -> torch.Tensor:
    """A small host-built table on `device` without waiting for the GPU: a blocking copy synchronises the stream
    first, an asynchronous one from pageable memory is staged before the call returns, so the CPU tensor may go at
    once."""
    return t.to(device, dtype, non_blocking=True)


def _positions_to_device(q_pos: torch.Tensor, device) -> torch.Tensor:
    """Host-built positions on `device` as int32. Consecutive ones (training and one-pass prefill: first + 0..T-1) are
    made there by `arange` instead of copied: nothing read from host memory, so a CUDA graph can record the call."""
    n = q_pos.numel()
    if q_pos.device.type == "cpu" and n and bool((q_pos.view(-1)[1:] - q_pos.view(-1)[:-1] == 1).all()):
        first = int(q_pos.view(-1)[0])
        return torch.arange(first, first + n, device=device, dtype=torch.int32)
    return _host_to_device(q_pos, device).contiguous()


def _documents(cu_seqlens, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents: (starts, lengths) as CPU int64 tensors, validated against the packed length. A CPU
    `cu_seqlens` costs no host synchronisation; a CUDA one waits for the GPU."""
    cu = torch.as_tensor(cu_seqlens).detach().to("cpu", torch.int64).view(-1)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {cu.tolist()[:8]}...")
    return cu[:-1], cu[1:] - cu[:-1]


def _coarse_count(nc, kernel: int, stride: int, coarse_kernel: int, coarse_stride: int):
    span = (coarse_kernel // kernel - 1) * (kernel // stride)
    step = coarse_stride // stride
    if isinstance(nc, torch.Tensor):
        return torch.where(nc > span, torch.div(nc - 1 - span, step, rounding_mode="floor") + 1, 0)
    return 0 if nc <= span else (nc - 1 - span) // step + 1


def _launch_extra(tuning: dict, part: str) -> dict:
    """Optional launch options from `tuning` (e.g. {"fwd_maxnreg": 128}): a register cap per thread."""
    cap = tuning.get(f"{part}_maxnreg")
    return {} if cap is None else {"maxnreg": cap}


def _tiles(G: int, D: int, rows: int = 128) -> tuple[int, int]:
    """(GP, BLOCK_T): heads padded to a power of two, and tokens per tile so that GP * BLOCK_T ~ rows (>= 16)."""
    GP = _pow2(G)
    rows = rows if D <= 128 else rows // 2
    return GP, max(1, rows // GP, -(-16 // GP))
