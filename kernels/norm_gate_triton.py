"""Fused output RMSNorm + sigmoid gate of the Lightning layer (docs/design.md §3.1), in Triton:

    y = sigmoid(z) * (w * RMSNorm(o)),   RMSNorm(o) = o / sqrt(mean(o^2) + eps)   over the last dimension (H * d)

The plain PyTorch composition (`rmsnorm_gate_reference` below, the model's HybridRMSNorm and gate) reads and writes
the (T, H*d) activations several times (float32 copy, square, mean, scale, cast, weight, sigmoid, product); this kernel
reads o and z once and writes y once, and its backward reads o, z, dy once and writes do, dz (dw from at most
`max_programs` per-program partial sums). A program handles ROWS rows at a time; the statistics are float32.

This file imports only torch and triton (triton inside try so that machines without it can still import the model).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "rmsnorm_gate_reference", "rmsnorm_gate_triton"]


def rmsnorm_gate_reference(o: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's composition in plain PyTorch (HybridRMSNorm, then the sigmoid gate when z is given)."""
    x = o.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * x.to(o.dtype)
    return y if z is None else torch.sigmoid(z) * y


if HAS_TRITON:

    @triton.jit
    def _sum(x, y):
        return x + y

    @triton.jit
    def _norm_gate_fwd_kernel(O, Z, W, Y, Rstd, n_rows, N, eps, HAS_Z: tl.constexpr, ROWS: tl.constexpr,
                              BN: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BN)
        mr = rows < n_rows
        m = mr[:, None] & (cols[None, :] < N)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        o = tl.load(O + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.reduce(o * o, 1, _sum) / N + eps)
        y = (o * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32) * w[None, :]
        if HAS_Z:
            z = tl.load(Z + offs, mask=m, other=0.0).to(tl.float32)
            y = y / (1.0 + tl.exp(-z))
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)
        tl.store(Rstd + rows, rstd, mask=mr)

    @triton.jit
    def _norm_gate_bwd_kernel(O, Z, W, DY, Rstd, DO, DZ, DWp, n_rows, N, n_blocks, HAS_Z: tl.constexpr,
                              ROWS: tl.constexpr, BN: tl.constexpr):
        # a program walks row blocks pid, pid + grid, ... and keeps its share of dw in registers
        pid = tl.program_id(0)
        cols = tl.arange(0, BN)
        mc = cols < N
        w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        dw = tl.full((BN,), 0.0, tl.float32)
        for blk in range(pid, n_blocks, tl.num_programs(0)):
            rows = blk * ROWS + tl.arange(0, ROWS)
            mr = rows < n_rows
            m = mr[:, None] & mc[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            o = tl.load(O + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + rows, mask=mr, other=0.0)
            n = o * rstd[:, None]
            if HAS_Z:
                z = tl.load(Z + offs, mask=m, other=0.0).to(tl.float32)
                s = 1.0 / (1.0 + tl.exp(-z))
                tl.store(DZ + offs, (dy * n * w[None, :] * s * (1.0 - s)).to(DZ.dtype.element_ty), mask=m)
                da = dy * s
            else:
                da = dy
            dw += tl.reduce(da * n, 0, _sum)
            dn = da * w[None, :]
            c = tl.reduce(dn * n, 1, _sum) / N
            tl.store(DO + offs, (rstd[:, None] * (dn - n * c[:, None])).to(DO.dtype.element_ty), mask=m)
        tl.store(DWp + pid * N + cols, dw, mask=mc)


def _rows_for(n: int, elements: int) -> int:
    # about `elements` a program: enough rows to amortise, few enough to stay in registers
    return max(1, min(16, elements // triton.next_power_of_2(n)))


class _NormGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, z, weight, eps, max_programs):
        shape = o.shape
        N = shape[-1]
        o2 = o.reshape(-1, N).contiguous()
        z2 = None if z is None else z.reshape(-1, N).contiguous()
        R = o2.shape[0]
        y = torch.empty_like(o2)
        rstd = torch.empty(R, device=o.device, dtype=torch.float32)
        rows = _rows_for(N, 8192)
        _norm_gate_fwd_kernel[(triton.cdiv(R, rows),)](
            o2, o2 if z2 is None else z2, weight, y, rstd, R, N, float(eps), HAS_Z=z2 is not None, ROWS=rows,
            BN=triton.next_power_of_2(N), num_warps=8)
        ctx.save_for_backward(o2, z2, weight, rstd)
        ctx.shape, ctx.max_programs = shape, max_programs
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        o2, z2, weight, rstd = ctx.saved_tensors
        N = o2.shape[-1]
        R = o2.shape[0]
        dy2 = dy.reshape(-1, N).contiguous()
        do = torch.empty_like(o2)
        dz = None if z2 is None else torch.empty_like(z2)
        rows = _rows_for(N, 4096)  # the backward keeps more tensors live
        n_blocks = triton.cdiv(R, rows)
        grid = min(n_blocks, ctx.max_programs)  # dw: one partial row per program, summed below
        dwp = torch.empty(grid, N, device=o2.device, dtype=torch.float32)
        _norm_gate_bwd_kernel[(grid,)](
            o2, o2 if z2 is None else z2, weight, dy2, rstd, do, do if dz is None else dz, dwp, R, N, n_blocks,
            HAS_Z=z2 is not None, ROWS=rows, BN=triton.next_power_of_2(N), num_warps=8)
        dw = dwp.sum(0).to(weight.dtype)
        return do.view(ctx.shape), (None if dz is None else dz.view(ctx.shape)), dw, None, None


def rmsnorm_gate_triton(o: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        max_programs: int = 1024) -> torch.Tensor:
    """Same contract as `rmsnorm_gate_reference`: o, z (..., N) of one dtype, weight (N,); differentiable in all three.
    `max_programs`: programs of the backward (each walks its share of the rows and writes one partial dw)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use rmsnorm_gate_reference")
    if weight.shape != (o.shape[-1],):
        raise ValueError(f"weight must have shape ({o.shape[-1]},), got {tuple(weight.shape)}")
    if z is not None and (z.shape != o.shape or z.dtype != o.dtype):
        raise ValueError(f"z must match o: got {tuple(z.shape)} {z.dtype} vs {tuple(o.shape)} {o.dtype}")
    return _NormGate.apply(o, z, weight, eps, int(max_programs))
