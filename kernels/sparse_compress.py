"""InfLLM-V2 sparse Triton kernels, stage 1: compressed keys K1 (`compress_keys_triton`) and the coarse keys K2
built from them (`coarse_from_compressed`). See sparse_triton.py.
"""

from __future__ import annotations

import torch

from .sparse_common import HAS_TRITON, _coarse_count, _count, _documents, _host_to_device, tl, triton

if HAS_TRITON:

    @triton.jit
    def _compress_kernel(
        K, O, STARTS, NC, H, s_kb, s_kh, s_kt, s_ob, s_oh, s_oc,
        KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr,
        USE_STARTS: tl.constexpr,
    ):
        # Compressed key c = mean of KERNEL keys from token start(c): c * STRIDE, or STARTS[c] (packed documents).
        pid_c = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        d = tl.arange(0, D)
        cm = c < NC
        if USE_STARTS:
            start = tl.load(STARTS + c, mask=cm, other=0).to(tl.int64)
        else:
            start = (c * STRIDE).to(tl.int64)
        base = K + b * s_kb + h * s_kh
        acc = tl.zeros([BLOCK_C, D], dtype=tl.float32)
        for w in range(KERNEL):
            acc += tl.load(base + (start + w)[:, None] * s_kt + d[None, :], mask=cm[:, None], other=0.0).to(tl.float32)
        acc = acc / KERNEL
        tl.store(O + b * s_ob + h * s_oh + c[:, None].to(tl.int64) * s_oc + d[None, :], acc, mask=cm[:, None])


def compress_keys_triton(k: torch.Tensor, kernel: int = 32, stride: int = 16, cu_seqlens=None) -> torch.Tensor:
    """Mean-pool keys over windows: (B, H, T, D) -> (B, H, Nc, D) float32 (as `compress_keys`). With `cu_seqlens`
    (packed documents, B == 1) each document is pooled on its own and the results are concatenated."""
    B, H, T, D = k.shape
    starts = None
    if cu_seqlens is None:
        n = _count(T, kernel, stride)
    else:
        a, L = _documents(cu_seqlens, T)
        nc = _count(L, kernel, stride)
        n = int(nc.sum())
        first = torch.cumsum(nc, 0) - nc
        doc = torch.repeat_interleave(torch.arange(len(nc)), nc)
        starts = _host_to_device(a[doc] + (torch.arange(n) - first[doc]) * stride, k.device)
    out = torch.empty(B, H, n, D, dtype=torch.float32, device=k.device)
    if n == 0:
        return out
    if k.stride(-1) != 1:
        k = k.contiguous()
    block_c = 32
    grid = (triton.cdiv(n, block_c), B * H)
    _compress_kernel[grid](k, out, starts if starts is not None else out, n, H, k.stride(0), k.stride(1), k.stride(2),
                           out.stride(0), out.stride(1), out.stride(2), KERNEL=kernel, STRIDE=stride, BLOCK_C=block_c,
                           D=D, USE_STARTS=starts is not None)
    return out


def coarse_from_compressed(ckeys: torch.Tensor, kernel: int, stride: int, coarse_kernel: int = 128,
                           coarse_stride: int = 64, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Coarse keys K2 (mean over windows of `coarse_kernel`, step `coarse_stride`) built exactly from K1: the mean of
    the coarse_kernel/kernel non-overlapping K1 windows that tile each coarse window. `counts`: K1 keys per packed
    document (CPU int64; K1 concatenated over documents), each document's K2 from its own K1, concatenated."""
    if coarse_kernel % kernel or coarse_stride % stride or kernel % stride:
        raise ValueError("coarse_kernel must be a multiple of kernel, coarse_stride of stride and kernel of stride")
    span = (coarse_kernel // kernel - 1) * (kernel // stride)  # K1 index span of one coarse window
    step = coarse_stride // stride
    nc = ckeys.shape[2] if counts is None else counts
    n2 = _coarse_count(nc, kernel, stride, coarse_kernel, coarse_stride)
    dev = ckeys.device
    if counts is None:  # built on the device: no host copy (the decode step is captured in CUDA graphs)
        first = torch.arange(n2, device=dev) * step
    else:
        c0 = torch.cumsum(counts, 0) - counts
        doc = torch.repeat_interleave(torch.arange(len(counts)), n2)
        first = _host_to_device(c0[doc] + (torch.arange(int(n2.sum())) - (torch.cumsum(n2, 0) - n2)[doc]) * step,
                                dev, torch.int64)
    total = int(first.numel())
    if total == 0:
        return ckeys.new_zeros(ckeys.shape[0], ckeys.shape[1], 0, ckeys.shape[3])
    idx = first.view(-1, 1) + torch.arange(0, span + 1, kernel // stride, device=dev).view(1, -1)
    return ckeys[:, :, idx.view(-1)].view(ckeys.shape[0], ckeys.shape[1], total, -1, ckeys.shape[3]).mean(3)
