"""Distillation and language-model losses over a vocabulary, per row of logits, with their gradient w.r.t. the
student's logits (docs/design.md §3.4: HALO's stage 2 is forward KL on the logits):

    forward  KL(p_t || p_s) = sum_v p_t (log p_t - log p_s),  grad  T (p_s - p_t)
    reverse  KL(p_s || p_t) = sum_v p_s (log p_s - log p_t),  grad  T p_s (log p_s - log p_t - KL)
    ce       -log p_s[y],                                      grad  p_s - onehot(y)

with p = softmax(logits / T); the KL values are multiplied by T^2. `row_loss_reference` is the plain PyTorch form
(the trainer runs it in chunks of rows on the CPU); `row_losses_triton` does the same in two passes over each row:
the first keeps running maxima and sums of exponentials (and the sum the KL needs), the second writes the gradient.
It reads the bf16 logits twice and writes the bf16 gradient once, where the PyTorch form copies every chunk to float32
and makes a dozen passes over it (at 16 x 2048 tokens and a 49K vocabulary, one float32 copy of the logits is 6.4 GB).

Training only: `hybridize.export` leaves this file out of exported model folders. This file imports only torch and
triton (triton inside try so that machines without it can still import it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "MODES", "row_loss_reference", "row_losses_triton"]

MODES = ("forward", "reverse", "ce")


def row_loss_reference(s: torch.Tensor, other: torch.Tensor, mode: str, temperature: float = 1.0,
                       need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss per row, d loss / d s or None) for student logits `s` (R, V) in the compute dtype; `other` is the
    teacher's logits (R, V) for the KL modes, the targets (R,) for ce (a negative target gives some finite value:
    the caller drops that row)."""
    T = float(temperature)
    if mode == "ce":
        y = other.clamp(min=0)
        log_p = F.log_softmax(s, dim=-1)
        loss = -log_p.gather(1, y[:, None]).squeeze(1)
        g = None
        if need_grad:
            g = log_p.exp_()
            g.scatter_add_(1, y[:, None], -torch.ones_like(g[:, :1]))
        return loss, g
    log_s = F.log_softmax(s / T, dim=-1)
    log_t = F.log_softmax(other.to(s.dtype) / T, dim=-1)
    g = None
    if mode == "forward":
        p_t = log_t.exp()
        loss = (p_t * (log_t - log_s)).sum(-1)
        if need_grad:
            g = (log_s.exp() - p_t) * T
    elif mode == "reverse":
        p_s = log_s.exp()
        d = log_s - log_t
        loss = (p_s * d).sum(-1)
        if need_grad:
            g = p_s * (d - loss[:, None]) * T
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return loss * T**2, g


if HAS_TRITON:
    # tl.reduce with combine functions of this file rather than tl.max / tl.sum: those are decorated when triton is
    # imported, so a test that loads this file under the interpreter could not call them from an interpreted kernel

    @triton.jit
    def _add(x, y):
        return x + y

    @triton.jit
    def _larger(x, y):
        return tl.maximum(x, y)

    @triton.jit
    def _row_loss_kernel(S, O, Y, KEEP, LOSS, G, V, stride_s, stride_o, stride_g, inv_t, t_grad, loss_scale,
                         MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        s_row = S + r * stride_s
        o_row = O + r * stride_o
        ninf = tl.full([BLOCK], float("-inf"), tl.float32)
        m_s = tl.reduce(ninf, 0, _larger)
        m_t = tl.reduce(ninf, 0, _larger)
        z_s = tl.reduce(tl.full([BLOCK], 0.0, tl.float32), 0, _add)
        z_t = z_s
        acc = z_s  # forward: sum e^(t - m_t) (t - s); reverse: sum e^(s - m_s) (s - t)
        for a in range(0, V, BLOCK):
            c = a + cols
            msk = c < V
            s = tl.load(s_row + c, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
            new_ms = tl.maximum(m_s, tl.reduce(s, 0, _larger))
            es = tl.exp(s - new_ms)
            alpha_s = tl.exp(m_s - new_ms)
            z_s = z_s * alpha_s + tl.reduce(es, 0, _add)
            if MODE != 2:
                t = tl.load(o_row + c, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
                new_mt = tl.maximum(m_t, tl.reduce(t, 0, _larger))
                et = tl.exp(t - new_mt)
                alpha_t = tl.exp(m_t - new_mt)
                z_t = z_t * alpha_t + tl.reduce(et, 0, _add)
                diff = tl.where(msk, t, 0.0) - tl.where(msk, s, 0.0)  # no -inf - -inf in the padding
                if MODE == 0:
                    acc = acc * alpha_t + tl.reduce(et * diff, 0, _add)
                else:
                    acc = acc * alpha_s - tl.reduce(es * diff, 0, _add)
                m_t = new_mt
            m_s = new_ms
        lse_s = m_s + tl.log(z_s)
        keep = tl.load(KEEP + r) != 0
        if MODE == 2:
            y = tl.maximum(tl.load(Y + r), 0)
            loss = lse_s - tl.load(s_row + y).to(tl.float32)
            lse_t = lse_s  # unused
            kl = loss
        else:
            lse_t = m_t + tl.log(z_t)
            if MODE == 0:
                kl = acc / z_t + lse_s - lse_t
            else:
                kl = acc / z_s - lse_s + lse_t
            loss = kl * loss_scale
        tl.store(LOSS + r, tl.where(keep, loss, 0.0))
        if WRITE_GRAD:
            g_row = G + r * stride_g
            for a in range(0, V, BLOCK):
                c = a + cols
                msk = c < V
                s = tl.load(s_row + c, mask=msk, other=0.0).to(tl.float32) * inv_t
                p_s = tl.exp(s - lse_s)
                if MODE == 2:
                    g = p_s - tl.where(c == y, 1.0, 0.0)
                else:
                    t = tl.load(o_row + c, mask=msk, other=0.0).to(tl.float32) * inv_t
                    if MODE == 0:
                        g = (p_s - tl.exp(t - lse_t)) * t_grad
                    else:
                        g = p_s * ((s - lse_s) - (t - lse_t) - kl) * t_grad
                tl.store(g_row + c, tl.where(keep, g, 0.0).to(G.dtype.element_ty), mask=msk)


def row_losses_triton(student: torch.Tensor, other: torch.Tensor, keep: torch.Tensor, mode: str,
                      temperature: float = 1.0, need_grad: bool = True,
                      block: int = 4096) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`row_loss_reference` for every row of `student` (R, V) at once: (float32 loss per row, 0 where `keep` is
    false; the gradient in the student's dtype, 0 on dropped rows, or None). `other`: the teacher's logits (R, V) or
    the targets (R,)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    R, V = student.shape
    if student.stride(-1) != 1:
        student = student.contiguous()
    ce = mode == "ce"
    if not ce and other.stride(-1) != 1:
        other = other.contiguous()
    loss = torch.empty(R, device=student.device, dtype=torch.float32)
    grad = torch.empty_like(student) if need_grad else None
    if R == 0:
        return loss, grad
    T = 1.0 if ce else float(temperature)
    block = min(block, triton.next_power_of_2(V))
    _row_loss_kernel[(R,)](
        student, student if ce else other, other if ce else keep, keep.to(torch.int8), loss,
        grad if need_grad else loss, V, student.stride(0), 0 if ce else other.stride(0),
        grad.stride(0) if need_grad else 0, 1.0 / T, T, T * T,
        MODE=MODES.index(mode), WRITE_GRAD=need_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss, grad
