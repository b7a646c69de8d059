"""Lightning attention in Triton: the decode step (a few new tokens against a carried state, no autograd).
"""

from __future__ import annotations

import torch

from .lightning_common import HAS_TRITON, _check, _pow2, _require_triton, _rows, tl, triton

if HAS_TRITON:
    from .lightning_common import _state_tile

    @triton.jit
    def _add(x, y):
        # The kernels here call no jit helper of triton's own library (tl.sum, tl.zeros, tl.cdiv): the tests build this
        # file for the Triton interpreter inside a process where triton was imported compiled, and helpers decorated
        # then cannot run under the interpreter.
        return x + y

    @triton.jit
    def _decode_step_kernel(
        Q, K, V, O, SIn, SOut, LogDecay,
        TN, H, DK, DV,
        s_qb, s_qh, s_qt,
        s_kb, s_kh, s_kt,
        s_vb, s_vh, s_vt,
        s_ob, s_oh, s_ot,
        s_ib, s_ih, s_ir, s_ic,
        s_sb, s_sh, s_sr, s_sc,
        scale,
        BK: tl.constexpr, BV: tl.constexpr,
    ):
        b, h, rk, rv, mk, mv, m2 = _state_tile(tl.program_id(0), tl.program_id(1), H, DK, DV, BK, BV)
        S = tl.load(SIn + b * s_ib + h * s_ih + rk[:, None] * s_ir + rv[None, :] * s_ic, mask=m2, other=0.0)
        g = tl.exp(tl.load(LogDecay + h).to(tl.float32))
        for t in range(TN):
            q = tl.load(Q + b * s_qb + h * s_qh + t * s_qt + rk, mask=mk, other=0.0).to(tl.float32)
            k = tl.load(K + b * s_kb + h * s_kh + t * s_kt + rk, mask=mk, other=0.0).to(tl.float32)
            v = tl.load(V + b * s_vb + h * s_vh + t * s_vt + rv, mask=mv, other=0.0).to(tl.float32)
            S = S * g + k[:, None] * v[None, :]
            o = tl.reduce(q[:, None] * S, 0, _add) * scale
            tl.store(O + b * s_ob + h * s_oh + t * s_ot + rv, o.to(O.dtype.element_ty), mask=mv)
        tl.store(SOut + b * s_sb + h * s_sh + rk[:, None] * s_sr + rv[None, :] * s_sc, S, mask=m2)



def _decode(q, k, v, log_decay, state_in, state_out, scale, block_v):
    B, H, TN, DK = q.shape
    DV = v.shape[-1]
    o = torch.empty(B, H, TN, DV, device=q.device, dtype=q.dtype)
    BV = min(_pow2(block_v), _pow2(DV))
    grid = (B * H, triton.cdiv(DV, BV))
    _decode_step_kernel[grid](
        q, k, v, o, state_in, state_out, log_decay,
        TN, H, DK, DV,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        *state_in.stride(), *state_out.stride(),
        float(scale), BK=_pow2(DK), BV=BV, num_warps=4,
    )
    return o


def _decode_block(batch_heads: int, dv: int) -> int:
    # enough programs to cover the multiprocessors several times over
    return 64 if batch_heads * triton.cdiv(dv, 64) >= 512 else 32


def lightning_attn_recurrent_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Token-by-token recurrence for a few new tokens (no autograd). Same contract as
    `lightning_reference.lightning_attn_recurrent`; `initial_state` is left untouched."""
    _require_triton()
    if cu_seqlens is not None:
        raise ValueError("the decode kernel takes (B, H, T, D) batches; use lightning_attn_chunked_triton for cu_seqlens")
    _check(q, k, v, log_decay, initial_state, None, 64)
    B, H, _, DK = q.shape
    DV = v.shape[-1]
    scale = DK ** -0.5 if scale is None else float(scale)
    state_in = (torch.zeros(B, H, DK, DV, device=q.device, dtype=torch.float32) if initial_state is None
                else initial_state.float())
    state_out = torch.empty(B, H, DK, DV, device=q.device, dtype=torch.float32)
    o = _decode(_rows(q), _rows(k), _rows(v), log_decay.detach().float().contiguous(), state_in, state_out, scale,
                _decode_block(B * H, DV))
    return o, (state_out if output_final_state else None)


def lightning_attn_step_triton(q, k, v, log_decay, state, scale=None, block_v: int | None = None):
    """One or a few decode tokens; updates `state` (float32, (B, H, Dk, Dv)) in place and returns o."""
    _require_triton()
    _check(q, k, v, log_decay, state, None, 64)
    if state.dtype != torch.float32:
        raise ValueError(f"state must be float32, got {state.dtype}")
    B, H, _, DK = q.shape
    scale = DK ** -0.5 if scale is None else float(scale)
    block_v = block_v or _decode_block(B * H, v.shape[-1])
    return _decode(_rows(q), _rows(k), _rows(v), log_decay.detach().float().contiguous(), state, state, scale,
                   block_v)
