"""Lightning attention (decayed linear attention) in Triton: chunked forward/backward and a decode step.

Computes exactly the function of `lightning_reference.py` (same arguments, same outputs):

    S_t = g_h * S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t,   g_h = exp(log_decay[h])

Design (memory-bound at d = 128 on Hopper). The chunk scan (`_scan_chunks_kernel`, and the forward's
`_fwd_lookback_kernel`): a program owns one (sequence, head, column tile) and walks the chunks of its sequence (or segment) in order, keeping its slice of the state in
registers, so no per-chunk state ever goes to memory. Per chunk of CH tokens, with M[i, j] = g^(i-j) for i >= j:

    out  = scale_out * ( ((a b^T) * M * scale_state) c  +  (g^(i+1) a) X )
    X   <- g^len X + scale_state * (g^(len-1-j) b)^T c

The same kernel walked backwards in time (REVERSE) gives the adjoint recurrence, so the backward pass is three scans:

    dq = scan(a=dO, b=v,  c=k,  X0 = S0^T)            forward in time, scale_out = scale
    dv = scan(a=k,  b=q,  c=dO, X0 = dS_T)            reverse in time, scale_state = scale; its last state * g = dS0
    dk = scan(a=v,  b=dO, c=q,  X0 = dS_T^T)          reverse in time, scale_state = scale

where dS_T is the gradient arriving at the final state (zero when unused). All decays are exp(log_decay * distance)
in float32; states and accumulation are float32; the intra-chunk products run on the tensor cores in the input dtype
(with `ScanConfig.state_lowp`, bf16 inputs also multiply a bf16 copy of the state: measured rel. error ~3e-3).

Parallelism: at B*H = 32 one program per head walks 1024 chunks at 64K tokens one after another and is latency-bound,
so long sequences are cut into segments that run in parallel; each needs the state entering it. Batches with few
sequences and heads (a small model's training steps) get segments shorter than the configured length, until about
`target_programs` walks run (`_lookback_segments`).

- Look-back forward (`_fwd_lookback_kernel`, `ScanConfig(lookback=True)`, `LOOKBACK_CONFIG`): ONE kernel with a decoupled look-back. A program takes a ticket from an
  atomic counter (segments vary slowest), sums its segment's k^T v into U, then obtains the state entering its segment
  from the segments before it: it walks back over their flags, adding a finished predecessor's end state (flag 2) or
  an unfinished one's own sum U (flag 1) and going on past it; it publishes its own end state (flag 2), then walks its
  chunks from the entering state and writes o. A program waits only on lower tickets, held by programs that are
  already running, so the waits cannot deadlock (and under the interpreter, which runs programs in order, nobody
  waits at all). Segments are short (512 tokens) so that the second read of k and v can hit L2 (the hints mark the
  first read evict-last): ideally q, k, v are read from memory once and o written once (bench/results/kernels-lightning.md has
  what was measured). Measured on an H100 it did not beat the two-pass forward at 64K and beyond: each program
  runs its segment sum and its walk one after the other, and the walk is latency-bound, so the saved memory pass
  does not pay for the longer programs; short segments (512 tokens) were slowest, 2048-token segments (no L2 reuse
  left) fastest. With three pipeline stages its float32 tiles need 216 of the 227 KB of shared memory. Under autograd the state entering each segment is saved for the dq scan.
- Overlap forward (`_fwd_overlap_kernel`, `ScanConfig(overlap=True)`, the bf16 default `DEFAULT_CONFIG`): one
  launch with two kinds of program in the order of one ticket counter, S(s) (sum segment s's decayed k^T v into Agg, flag 1) and
  W(s) (look back over the flags for the state entering segment s, publish the state at its end, flag 2, then walk
  the segment), ordered S(0), S(1), W(0), S(2), W(1), ... for `lead` = 1. The bandwidth-bound sums run beside the
  latency-bound walks instead of in a separate pass, and W(s) re-reads the k, v that S(s) read shortly before (L2,
  evict-last hint). W(s) waits only on S(j <= s), lower tickets that never wait: no deadlock. With 4 warps and
  64-column tiles (252 registers, 88 KB of shared memory with Triton 3.6) two programs fit on one SM, so a sum and a
  walk can share it; `decay_v` decays the rows of the 64-wide v tile instead of the 128-wide k tile in the state
  update (bench/lightning_compile_report.py: 692 instead of 861 instructions per chunk in the walk loop). Measured
  (run D, one H100, bench/results/kernels-lightning.md): faster than the look-back forward at 4K-256K, forward and forward + backward
  (64K forward 1.32 vs 1.45 ms) with 4096-token segments; shorter segments, whose k and v could stay in L2, were
  slower (512: 1.54 ms), so the gain comes from fewer, longer walks sharing SMs with the sums, not from L2 reuse.
- Two-pass forward (`lookback=False`; always for cu_seqlens): a first pass (STATE_ONLY) sums
  each segment's b^T c into U_s (k and v are read twice from memory), then every segment runs in parallel from
  g^(...) X0 + the sum of the U of the segments before it.
- Backward: dq runs on the forward's segments, each from the saved entering state (transposed); dv and dk use the
  two-pass scheme, dv's U (q^T dO) transposed serving dk.

`cu_seqlens` packs documents along T (B must be 1): a program then owns one document, and the state restarts there.
The decode kernel reads each (batch, head) state tile once, applies one or a few tokens and writes it once.

Files (flat, side by side in kernels/ and in every exported model folder): lightning_common.py (ScanConfig, the chunk
scan and its launchers), lightning_forward.py (the one-launch forwards), lightning_autograd.py (forward + the three
backward scans), lightning_decode.py (the decode step); this file holds the public entry points and re-exports.
They import only torch and triton (triton inside try so that machines without it can still import the model).
"""

from __future__ import annotations

import torch

from .lightning_autograd import _LightningChunked
from .lightning_common import DEFAULT_BWD_CONFIG, DEFAULT_CONFIG, HAS_TRITON, OTHER_DTYPE_CONFIG, OTHER_DTYPE_FWD_CONFIG
from .lightning_common import ScanConfig, _check, _require_triton
from .lightning_common import LOOKBACK_CONFIG, _scan, _segment_sums, _segments  # noqa: F401 (tests and bench)
from .lightning_decode import lightning_attn_recurrent_triton, lightning_attn_step_triton
from .lightning_forward import _ticketed_forward  # noqa: F401 (tests and bench)

__all__ = [
    "HAS_TRITON",
    "ScanConfig",
    "lightning_attn_chunked_triton",
    "lightning_attn_recurrent_triton",
    "lightning_attn_step_triton",
]


def lightning_attn_chunked_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: torch.Tensor | None = None,
    config: ScanConfig | None = None,
    bwd_config: ScanConfig | None = None,
):
    """Chunked form for training and prefill; differentiable in q, k, v, initial_state and through the final state.
    Same contract as `lightning_reference.lightning_attn_chunked`. Returns (o, final_state or None).
    `config` / `bwd_config`: launch parameters of the forward scan and of the three backward scans."""
    _require_triton()
    _check(q, k, v, log_decay, initial_state, cu_seqlens, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    log_decay = log_decay.detach().float().contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if initial_state is not None:
        initial_state = initial_state.float()
    bf16 = q.dtype == torch.bfloat16
    config = config or (DEFAULT_CONFIG if bf16 else OTHER_DTYPE_FWD_CONFIG)
    bwd_config = bwd_config or (DEFAULT_BWD_CONFIG if bf16 else OTHER_DTYPE_CONFIG)
    for c in (config, bwd_config):
        if c.chunk not in (None, 16, 32, 64, 128):
            raise ValueError(f"ScanConfig.chunk must be None, 16, 32, 64 or 128, got {c.chunk}")
        if c.walk_qk_hint not in ("evict_first", "evict_last", ""):
            raise ValueError(f"ScanConfig.walk_qk_hint must be 'evict_first', 'evict_last' or '', got {c.walk_qk_hint!r}")
    # a backward can follow: the forward then keeps what the dq scan needs
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, initial_state))
    res = _LightningChunked.apply(q, k, v, log_decay, initial_state, scale, bool(output_final_state), cu_seqlens,
                                  chunk_size, config, bwd_config, grad)
    if output_final_state:
        return res
    return res, None
