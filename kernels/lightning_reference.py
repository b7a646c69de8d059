"""Lightning attention (decayed linear attention) in plain PyTorch: the reference for the Triton kernels.

The function, per head h with a fixed decay g_h = exp(log_decay[h]) in (0, 1):

    S_t = g_h * S_{t-1} + k_t^T v_t          (S: d_k x d_v, float32)
    o_t = scale * q_t S_t

Shapes: q, k (B, H, T, Dk); v (B, H, T, Dv); log_decay (H,) with negative entries; initial_state (B, H, Dk, Dv).
All arithmetic is float32; outputs come back in the dtype of q, states stay float32.

`cu_seqlens` (int tensor [0, n_1, n_1 + n_2, ..., T]) marks documents packed along T (B must be 1); the state restarts
at zero at every document start, and `initial_state` then has one entry per document (N, H, Dk, Dv).

This file imports only torch: it is copied into every exported model folder as the fallback path.
"""

from __future__ import annotations

import torch

__all__ = ["lightning_attn_chunked", "lightning_attn_recurrent", "lightning_attn_step"]


def _chunked_one(q, k, v, log_decay, scale, state, chunk_size):
    """q, k, v float32 (B, H, T, D); state float32 (B, H, Dk, Dv) or None. Returns o (float32), final state."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, Dk, Dv)
    ld = log_decay.view(1, H, 1, 1)
    outs = []
    for start in range(0, T, chunk_size):
        qc = q[:, :, start : start + chunk_size] * scale
        kc = k[:, :, start : start + chunk_size]
        vc = v[:, :, start : start + chunk_size]
        c = qc.shape[2]
        idx = torch.arange(c, device=q.device, dtype=torch.float32)
        # M[t, s] = g^(t - s) for t >= s: the decay between key s and query t inside the chunk.
        diff = idx.view(c, 1) - idx.view(1, c)
        mask = torch.exp(ld * diff.clamp(min=0)) * (diff >= 0)
        intra = ((qc @ kc.transpose(-1, -2)) * mask) @ vc
        # Query t (0-based) sees the carried state decayed t + 1 times.
        q_decay = torch.exp(ld * (idx + 1).view(1, 1, c, 1))
        inter = (qc * q_decay) @ state
        outs.append(intra + inter)
        # Key s contributes to the end-of-chunk state decayed (c - 1 - s) times.
        k_decay = torch.exp(ld * (c - 1 - idx).view(1, 1, c, 1))
        state = torch.exp(ld * c) * state + (kc * k_decay).transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2), state


def _split_documents(fn, q, k, v, initial_state, cu_seqlens):
    if q.shape[0] != 1:
        raise ValueError("cu_seqlens needs batch size 1 (documents packed along the time axis)")
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None if initial_state is None else initial_state[i : i + 1]
        o, s = fn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], init)
        outs.append(o)
        states.append(s)
    return torch.cat(outs, dim=2), torch.cat(states, dim=0)


def lightning_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: torch.Tensor | None = None,
):
    """Chunked parallel form (training and prefill). Returns (o, final_state or None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    ld = log_decay.float()

    def run(q_, k_, v_, init):
        init = None if init is None else init.float()
        return _chunked_one(q_.float(), k_.float(), v_.float(), ld, scale, init, chunk_size)

    if cu_seqlens is None:
        o, state = run(q, k, v, initial_state)
    else:
        o, state = _split_documents(run, q, k, v, initial_state, cu_seqlens)
    return o.to(dtype), (state if output_final_state else None)


def lightning_attn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Token-by-token recurrence (decoding). Same contract as `lightning_attn_chunked`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    g = log_decay.float().exp().view(1, -1, 1, 1)

    def run(q_, k_, v_, init):
        B, H, T, Dk = q_.shape
        state = q_.new_zeros(B, H, Dk, v_.shape[-1], dtype=torch.float32) if init is None else init.float()
        outs = []
        for t in range(T):
            kt = k_[:, :, t].float()
            vt = v_[:, :, t].float()
            state = g * state + kt.unsqueeze(-1) * vt.unsqueeze(-2)
            outs.append((q_[:, :, t].float() * scale).unsqueeze(-2) @ state)
        o = torch.cat(outs, dim=2) if outs else q_.new_zeros(B, H, 0, v_.shape[-1], dtype=torch.float32)
        return o, state

    if cu_seqlens is None:
        o, state = run(q, k, v, initial_state)
    else:
        o, state = _split_documents(run, q, k, v, initial_state, cu_seqlens)
    return o.to(dtype), (state if output_final_state else None)


def lightning_attn_step(q, k, v, log_decay, state, scale=None):
    """One or a few decode tokens; updates `state` (float32, (B, H, Dk, Dv)) in place and returns o."""
    o, new_state = lightning_attn_recurrent(q, k, v, log_decay, scale, state, output_final_state=True)
    state.copy_(new_state)
    return o
