"""Fused per-head RMSNorm + RoPE of the Lightning layer's queries and keys (docs/design.md §3.1), in Triton:

    y = RoPE(w * RMSNorm(x))   over the head dimension D, x (B, T, H, D) -> y (B, H, T, D) in the attention's dtype

The plain PyTorch composition (`norm_rope_reference` below: the model's HybridRMSNorm, the transpose, `apply_rope`,
the cast to the value dtype) launches about 15 kernels forward and more backward per tensor, with float32 copies and
a transposed copy; this kernel reads x once and writes y once in the layout the attention kernel reads, and its
backward reads x and dy once and writes dx (dw from at most `max_programs` per-program partial sums). Roundings are
where the composition rounds: the normalised x to x's dtype, and w * x_hat and the rotation to their promoted dtype
when that is not float32 (a bf16 model without autocast).

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

__all__ = ["HAS_TRITON", "norm_rope_reference", "norm_rope_triton"]


def norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor | None,
                        sin: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The model's composition in plain PyTorch: RMSNorm (float32 statistics, the weight applied to the result in x's
    dtype), (B, H, T, D) order, RoPE in float32 with cos/sin (B or 1, T, D) when given, then `out_dtype`."""
    dtype = x.dtype
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    y = y.transpose(1, 2)
    if cos is not None:
        yf = y.float()
        half = yf.shape[-1] // 2
        rot = torch.cat((-yf[..., half:], yf[..., :half]), dim=-1)
        y = (yf * cos.unsqueeze(1) + rot * sin.unsqueeze(1)).to(y.dtype)
    return y.to(out_dtype)


if HAS_TRITON:

    @triton.jit
    def _sum(x, y):
        return x + y

    @triton.jit
    def _rows(blk, n_rows, T, H, ROWS: tl.constexpr):
        """Rows blk*ROWS.. in x's (b, t, h) order: their mask, x offsets, y offsets ((b, h, t) order), cos offsets
        (in units of D: the caller multiplies)."""
        rows = blk * ROWS + tl.arange(0, ROWS)
        mr = rows < n_rows
        r = rows.to(tl.int64)
        h = r % H
        bt = r // H
        t = bt % T
        b = bt // T
        return mr, r, (b * H + h) * T + t, b, t

    @triton.jit
    def _norm_rope_fwd_kernel(X, W, C, S, Y, Rstd, n_rows, T, H, D, cos_b, eps, HAS_ROPE: tl.constexpr,
                              ROUND_Y: tl.constexpr, ROWS: tl.constexpr, BH: tl.constexpr):
        half = D // 2
        cols = tl.arange(0, BH)
        mc = cols < half
        mr, r, yrow, b, t = _rows(tl.program_id(0), n_rows, T, H, ROWS)
        m = mr[:, None] & mc[None, :]
        xo = r[:, None] * D + cols[None, :]
        x1 = tl.load(X + xo, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + xo + half, mask=m, other=0.0).to(tl.float32)
        w1 = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        w2 = tl.load(W + half + cols, mask=mc, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.reduce(x1 * x1, 1, _sum) + tl.reduce(x2 * x2, 1, _sum)) / D + eps)
        y1 = (x1 * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32) * w1[None, :]
        y2 = (x2 * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32) * w2[None, :]
        if ROUND_Y:
            y1 = y1.to(X.dtype.element_ty).to(tl.float32)
            y2 = y2.to(X.dtype.element_ty).to(tl.float32)
        if HAS_ROPE:
            co = (b * cos_b + t)[:, None] * D + cols[None, :]
            c1 = tl.load(C + co, mask=m, other=0.0)
            c2 = tl.load(C + co + half, mask=m, other=0.0)
            s1 = tl.load(S + co, mask=m, other=0.0)
            s2 = tl.load(S + co + half, mask=m, other=0.0)
            o1 = y1 * c1 - y2 * s1
            o2 = y2 * c2 + y1 * s2
            if ROUND_Y:
                o1 = o1.to(X.dtype.element_ty).to(tl.float32)
                o2 = o2.to(X.dtype.element_ty).to(tl.float32)
        else:
            o1 = y1
            o2 = y2
        yo = yrow[:, None] * D + cols[None, :]
        tl.store(Y + yo, o1.to(Y.dtype.element_ty), mask=m)
        tl.store(Y + yo + half, o2.to(Y.dtype.element_ty), mask=m)
        tl.store(Rstd + r, rstd, mask=mr)

    @triton.jit
    def _norm_rope_bwd_kernel(X, W, C, S, DY, Rstd, DX, DWp, n_rows, T, H, D, cos_b, n_blocks,
                              HAS_ROPE: tl.constexpr, ROWS: tl.constexpr, BH: tl.constexpr):
        # a program walks row blocks pid, pid + grid, ... and keeps its share of dw in registers
        pid = tl.program_id(0)
        half = D // 2
        cols = tl.arange(0, BH)
        mc = cols < half
        w1 = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        w2 = tl.load(W + half + cols, mask=mc, other=0.0).to(tl.float32)
        dw1 = tl.full((BH,), 0.0, tl.float32)
        dw2 = tl.full((BH,), 0.0, tl.float32)
        for blk in range(pid, n_blocks, tl.num_programs(0)):
            mr, r, yrow, b, t = _rows(blk, n_rows, T, H, ROWS)
            m = mr[:, None] & mc[None, :]
            xo = r[:, None] * D + cols[None, :]
            yo = yrow[:, None] * D + cols[None, :]
            x1 = tl.load(X + xo, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(X + xo + half, mask=m, other=0.0).to(tl.float32)
            g1 = tl.load(DY + yo, mask=m, other=0.0).to(tl.float32)
            g2 = tl.load(DY + yo + half, mask=m, other=0.0).to(tl.float32)
            if HAS_ROPE:  # the rotation's transpose
                co = (b * cos_b + t)[:, None] * D + cols[None, :]
                c1 = tl.load(C + co, mask=m, other=0.0)
                c2 = tl.load(C + co + half, mask=m, other=0.0)
                s1 = tl.load(S + co, mask=m, other=0.0)
                s2 = tl.load(S + co + half, mask=m, other=0.0)
                r1 = g1 * c1 + g2 * s2
                g2 = g2 * c2 - g1 * s1
                g1 = r1
            rstd = tl.load(Rstd + r, mask=mr, other=0.0)
            n1 = x1 * rstd[:, None]
            n2 = x2 * rstd[:, None]
            dw1 += tl.reduce(g1 * n1.to(X.dtype.element_ty).to(tl.float32), 0, _sum)
            dw2 += tl.reduce(g2 * n2.to(X.dtype.element_ty).to(tl.float32), 0, _sum)
            d1 = g1 * w1[None, :]
            d2 = g2 * w2[None, :]
            c = (tl.reduce(d1 * n1, 1, _sum) + tl.reduce(d2 * n2, 1, _sum)) / D
            tl.store(DX + xo, (rstd[:, None] * (d1 - n1 * c[:, None])).to(DX.dtype.element_ty), mask=m)
            tl.store(DX + xo + half, (rstd[:, None] * (d2 - n2 * c[:, None])).to(DX.dtype.element_ty), mask=m)
        tl.store(DWp + pid * D + cols, dw1, mask=mc)
        tl.store(DWp + pid * D + half + cols, dw2, mask=mc)


def _rows_for(half: int, elements: int) -> int:
    # about `elements` values a program (both halves): enough rows to amortise, few enough to stay in registers
    return max(1, min(64, elements // (2 * triton.next_power_of_2(half))))


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, cos, sin, out_dtype, max_programs):
        B, T, H, D = x.shape
        x = x.contiguous()
        R = B * T * H
        y = torch.empty(B, H, T, D, device=x.device, dtype=out_dtype)
        rstd = torch.empty(R, device=x.device, dtype=torch.float32)
        has_rope = cos is not None
        if has_rope:
            cos, sin = cos.float().contiguous(), sin.float().contiguous()
        cos_b = T if has_rope and cos.shape[0] > 1 else 0  # rows of T between batches (0: one table for all)
        rows = _rows_for(D // 2, 8192)
        # a bf16 weight on a bf16 x: the composition rounds w * x_hat and the rotation to bf16
        round_y = x.dtype != torch.float32 and torch.promote_types(weight.dtype, x.dtype) == x.dtype
        _norm_rope_fwd_kernel[(triton.cdiv(R, rows),)](
            x, weight, cos if has_rope else x, sin if has_rope else x, y, rstd, R, T, H, D, cos_b, float(eps),
            HAS_ROPE=has_rope, ROUND_Y=round_y, ROWS=rows, BH=triton.next_power_of_2(D // 2), num_warps=4)
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        ctx.cos_b, ctx.max_programs = cos_b, max_programs
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, cos, sin, rstd = ctx.saved_tensors
        B, T, H, D = x.shape
        R = B * T * H
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        rows = _rows_for(D // 2, 4096)  # the backward keeps more tensors live
        n_blocks = triton.cdiv(R, rows)
        grid = min(n_blocks, ctx.max_programs)  # dw: one partial row per program, summed below
        dwp = torch.empty(grid, D, device=x.device, dtype=torch.float32)
        has_rope = cos is not None
        _norm_rope_bwd_kernel[(grid,)](
            x, weight, cos if has_rope else x, sin if has_rope else x, dy, rstd, dx, dwp, R, T, H, D, ctx.cos_b,
            n_blocks, HAS_ROPE=has_rope, ROWS=rows, BH=triton.next_power_of_2(D // 2), num_warps=4)
        dw = dwp.sum(0).to(weight.dtype)
        return dx, dw, None, None, None, None, None


def norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, out_dtype: torch.dtype, max_programs: int = 1024) -> torch.Tensor:
    """Same contract as `norm_rope_reference`: x (B, T, H, D) with D even, weight (D,), cos/sin (B or 1, T, D) or
    None (no rotation); returns (B, H, T, D) contiguous in out_dtype; differentiable in x and weight.
    `max_programs`: programs of the backward (each walks its share of the rows and writes one partial dw)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use norm_rope_reference")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be (B, T, H, D) with D even, got {tuple(x.shape)}")
    B, T, _, D = x.shape
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin go together (both None: no rotation)")
    if cos is not None and (cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B)
                            or tuple(cos.shape[1:]) != (T, D)):
        raise ValueError(f"cos/sin must be (1 or {B}, {T}, {D}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return _NormRope.apply(x, weight, eps, cos, sin, out_dtype, int(max_programs))
