"""Lightning attention in Triton: the chunked form's autograd function. Forward: the one-launch forward
(lightning_forward.py) or the two-pass chunk scan; backward: three chunk scans (dq, dv, dk; see lightning_triton.py).
"""

from __future__ import annotations

import torch

from .lightning_common import _block_c, _rows, _scan, _segments, triton
from .lightning_forward import _ticketed_forward


class _LightningChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, output_final_state, cu_seqlens, chunk, config,
                bwd_config, grad):
        q, k, v = _rows(q), _rows(k), _rows(v)
        B, H, T, _ = q.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        fwd_chunk = config.chunk or chunk
        if (config.lookback or config.overlap) and cu_seqlens is None:
            o, final, u, (nseg, segc), _ = _ticketed_forward(
                q, k, v, log_decay, init=initial_state, scale=scale, store_final=output_final_state,
                save_prefix=grad, chunk=fwd_chunk, config=config)
            prefix = True  # u: the state entering each segment, which (transposed) starts the dq scan's segments
        else:
            BC = _block_c(config, q.shape[-1], v.shape[-1])
            nseg, segc = _segments(T, fwd_chunk, N * H * triton.cdiv(v.shape[-1], BC), config, cu_seqlens is not None)
            o, final, u = _scan(q, k, v, log_decay, init=initial_state, init_transposed=False, reverse=False,
                                scale_out=scale, scale_state=1.0, store_final=output_final_state,
                                cu_seqlens=cu_seqlens, chunk=fwd_chunk, out_dtype=q.dtype, config=config, nseg=nseg,
                                segc=segc)
            prefix = False  # u: the forward's segment sums of k^T v, which (transposed) the dq scan needs (v^T k)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, cu_seqlens, u)
        ctx.scale, ctx.config, ctx.prefix = scale, bwd_config, prefix
        ctx.chunk, ctx.fwd_seg = bwd_config.chunk or chunk, (fwd_chunk, nseg, segc)
        if final is None:
            return o
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal=None):
        q, k, v, log_decay, initial_state, cu_seqlens, u_fwd = ctx.saved_tensors
        scale = ctx.scale
        do = _rows(do)
        dfinal = None if dfinal is None else dfinal.float()
        B, H, T, DK = q.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        common = dict(cu_seqlens=cu_seqlens, chunk=ctx.chunk, config=ctx.config)
        dq = dk = dv = dinit = u_rev = None
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        need_init = initial_state is not None and ctx.needs_input_grad[4]
        if need_q:
            # the dq scan runs on the forward's segments, from the forward's per-segment data
            fwd_chunk, nseg, segc = ctx.fwd_seg
            dq, _, _ = _scan(do, v, k, log_decay, init=initial_state, init_transposed=True, reverse=False,
                             scale_out=scale, scale_state=1.0, store_final=False, out_dtype=q.dtype, u=u_fwd,
                             u_transposed=True, prefix=ctx.prefix, nseg=nseg, segc=segc, cu_seqlens=cu_seqlens,
                             chunk=fwd_chunk, config=ctx.config, out_like=q)
        BC = _block_c(ctx.config, DK, v.shape[-1])
        nseg, segc = _segments(T, ctx.chunk, N * H * triton.cdiv(max(DK, v.shape[-1]), BC), ctx.config,
                               cu_seqlens is not None)
        if need_v or need_init:
            dv, dinit, u_rev = _scan(k, q, do, log_decay, init=dfinal, init_transposed=False, reverse=True,
                                     scale_out=1.0, scale_state=scale, store_final=need_init, out_dtype=v.dtype,
                                     nseg=nseg, segc=segc, out_like=v, **common)
        if need_k:
            # dk's segment sums (dO^T q) are dv's (q^T dO) transposed
            dk, _, _ = _scan(v, do, q, log_decay, init=dfinal, init_transposed=True, reverse=True,
                             scale_out=1.0, scale_state=scale, store_final=False, out_dtype=k.dtype, u=u_rev,
                             u_transposed=u_rev is not None, nseg=nseg, segc=segc, out_like=k, **common)
        if dinit is not None:
            dinit = dinit.to(initial_state.dtype)
        return dq, dk, (dv if need_v else None), None, dinit, None, None, None, None, None, None, None
