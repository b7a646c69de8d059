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
so long sequences are cut into segments that run in parallel; each needs the state entering it.

- Look-back forward (`_fwd_lookback_kernel`, `ScanConfig(lookback=True)`, `LOOKBACK_CONFIG`): ONE kernel with a decoupled look-back. A program takes a ticket from an
  atomic counter (segments vary slowest), sums its segment's k^T v into U, then obtains the state entering its segment
  from the segments before it: it walks back over their flags, adding a finished predecessor's end state (flag 2) or
  an unfinished one's own sum U (flag 1) and going on past it; it publishes its own end state (flag 2), then walks its
  chunks from the entering state and writes o. A program waits only on lower tickets, held by programs that are
  already running, so the waits cannot deadlock (and under the interpreter, which runs programs in order, nobody
  waits at all). Segments are short (512 tokens) so that the second read of k and v can hit L2 (the hints mark the
  first read evict-last): ideally q, k, v are read from memory once and o written once (bench/RESULTS.md has
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
  (run D, one H100, bench/RESULTS.md): faster than the look-back forward at 4K-256K, forward and forward + backward
  (64K forward 1.32 vs 1.45 ms) with 4096-token segments; shorter segments, whose k and v could stay in L2, were
  slower (512: 1.54 ms), so the gain comes from fewer, longer walks sharing SMs with the sums, not from L2 reuse.
- Two-pass forward (`lookback=False`; always for cu_seqlens): a first pass (STATE_ONLY) sums
  each segment's b^T c into U_s (k and v are read twice from memory), then every segment runs in parallel from
  g^(...) X0 + the sum of the U of the segments before it.
- Backward: dq runs on the forward's segments, each from the saved entering state (transposed); dv and dk use the
  two-pass scheme, dv's U (q^T dO) transposed serving dk.

`cu_seqlens` packs documents along T (B must be 1): a program then owns one document, and the state restarts there.
The decode kernel reads each (batch, head) state tile once, applies one or a few tokens and writes it once.

This file imports only torch and triton (triton inside try so that machines without it can still import the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "ScanConfig",
    "lightning_attn_chunked_triton",
    "lightning_attn_recurrent_triton",
    "lightning_attn_step_triton",
]


@dataclass(frozen=True)
class ScanConfig:
    """Launch parameters of the chunk scan. `block_c`: width of the column tile one program owns (more tiles, more
    programs); `state_lowp`: with bf16 inputs, multiply a bf16 copy of the carried state (faster) instead of the
    float32 state in tf32; `target_programs`: split each sequence into segments until about this many programs run (a first pass then
    sums each segment's keys and values into a state, and every segment starts from the sum of those before it);
    `min_segment_chunks`: never cut segments shorter than this many chunks. Forward only: `lookback` runs the
    one-kernel forward (decoupled look-back across segments of `segment_tokens` tokens; k and v of a segment are read
    twice, the second time mostly from L2) instead of the two-pass segment scan; `l2_hints` marks the first read of k
    and v evict-last and the streaming reads and writes evict-first. `publish_inclusive=False` (a check, slow) lets
    only the first segment publish the state at its end, so every look-back sums the others' own sums back to it:
    the path a segment takes on a GPU while its predecessors are busy, which the in-order interpreter never runs.
    `chunk`: tokens per chunk inside the kernel (16, 32, 64 or 128; the result does not depend on it); None: the
    caller's `chunk_size`. `inter_first` (scan kernel only; not faster in run D: 1.42-1.45 ms at 64K): compute the
    carried-state term first and accumulate the intra-chunk term into it (one accumulator, no decayed copy of a), as
    the look-back kernel does. `overlap` (forward only, no cu_seqlens; takes precedence over `lookback`): the one-launch forward
    whose segment-sum programs and walk programs take tickets from one counter, the sums `lead` segments ahead of the
    walks (segments of `segment_tokens` tokens), so that they overlap and the walks re-read k, v from L2;
    `decay_v` (that kernel only): the state update decays the rows of v (a block_c-wide tile) instead of those of k
    (all Dk columns), and takes k^T straight from shared memory; `sum_stages`: pipeline depth of its sum programs'
    loads (None: `num_stages`), deeper since they are bandwidth-bound. `walk_qk_hint` (look-back and overlap forwards,
    with `l2_hints`): the L2 eviction policy of the walks' q and k loads, "evict_first", "evict_last" or "" (none); with
    two or more column tiles the programs of one segment's tiles read the same q and k at about the same time."""

    block_c: int = 64
    num_warps: int = 8
    num_stages: int = 3
    state_lowp: bool = True
    target_programs: int = 1024
    min_segment_chunks: int = 4
    lookback: bool = False
    segment_tokens: int = 512
    l2_hints: bool = True
    publish_inclusive: bool = True
    chunk: int | None = None
    inter_first: bool = False
    overlap: bool = False
    lead: int = 1
    decay_v: bool = False
    sum_stages: int | None = None
    walk_qk_hint: str = "evict_first"


# The fastest of a sweep on one H100 (bench/bench_lightning.py --sweep, bf16, 32 heads, d = 128; bench/RESULTS.md):
# forward at 64K tokens, and the three backward scans at 16K behind that forward.
# bf16 forward: the overlap forward with 64-column tiles, 4 warps (two programs per SM), 4096-token segments and the
# v-side decay, the fastest of run D's sweep (2026-11-26, H100): forward 0.149 / 0.343 / 1.32 / 5.40 ms at
# 4K / 16K / 64K / 256K against the look-back forward's 0.165 / 0.373 / 1.45 / 5.66, and faster forward + backward at
# every length too. Packed documents (cu_seqlens) take the two-pass forward with the same target_programs.
DEFAULT_CONFIG = ScanConfig(block_c=64, num_warps=4, num_stages=2, state_lowp=True, target_programs=512,
                            overlap=True, segment_tokens=4096, decay_v=True)
# the bf16 default of run C (the one-kernel look-back forward, 2048-token segments)
LOOKBACK_CONFIG = ScanConfig(block_c=128, num_warps=8, num_stages=3, state_lowp=True, target_programs=1024,
                             lookback=True, segment_tokens=2048)
DEFAULT_BWD_CONFIG = ScanConfig(block_c=64, num_warps=8, num_stages=3, state_lowp=True, target_programs=1024)
# fp16 / fp32 inputs: the configuration the GPU tests passed with (a 128 x 128 fp32 tile with 3 pipeline stages would
# not fit in shared memory; these were not part of the sweep).
OTHER_DTYPE_CONFIG = ScanConfig(block_c=32, num_warps=4, num_stages=3, state_lowp=False, target_programs=1024)
# their look-back forward: two pipeline stages (with three, float32 tiles need 216 of the 227 KB of shared memory)
OTHER_DTYPE_FWD_CONFIG = ScanConfig(block_c=32, num_warps=4, num_stages=2, state_lowp=False, lookback=True,
                                    segment_tokens=512)

if HAS_TRITON:

    @triton.jit
    def _scan_chunks_kernel(
        A, Bm, Cm, Out, Init, Final, U, LogDecay, CuSeqlens,
        T, H, DA, DC, NSEG, SEGC, seg_offset,
        s_ab, s_ah, s_at,
        s_bb, s_bh, s_bt,
        s_cb, s_ch, s_ct,
        s_ob, s_oh, s_ot,
        s_in, s_ih, s_ir, s_ic,
        s_fn, s_fh, s_fr, s_fc,
        s_un, s_uh, s_us, s_ur, s_uc,
        scale_out, scale_state,
        CH: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr,
        HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr,
        STATE_LOWP: tl.constexpr, STATE_ONLY: tl.constexpr, USE_U: tl.constexpr, PREFIX: tl.constexpr,
        OFF32: tl.constexpr, INTER_FIRST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        seg = tl.program_id(2) + seg_offset
        n = pid // H
        h = pid % H
        if VARLEN:
            bos = tl.load(CuSeqlens + n).to(tl.int64)
            L = (tl.load(CuSeqlens + n + 1).to(tl.int64) - bos).to(tl.int32)
            nb = (n * 0).to(tl.int64)
        else:
            bos = (n * 0).to(tl.int64)
            L = T
            nb = n.to(tl.int64)
        h64 = h.to(tl.int64)
        n64 = n.to(tl.int64)
        a_base = A + nb * s_ab + h64 * s_ah
        b_base = Bm + nb * s_bb + h64 * s_bh
        c_base = Cm + nb * s_cb + h64 * s_ch
        o_base = Out + nb * s_ob + h64 * s_oh
        u_base = U + n64 * s_un + h64 * s_uh

        ra = tl.arange(0, BA)
        rc = pid_c * BC + tl.arange(0, BC)
        ma = ra < DA
        mc = rc < DC
        m2 = ma[:, None] & mc[None, :]
        u_tile = ra[:, None] * s_ur + rc[None, :] * s_uc
        idx = tl.arange(0, CH)
        fidx = idx.to(tl.float32)
        ld = tl.load(LogDecay + h).to(tl.float32)

        if REVERSE:
            diff = fidx[None, :] - fidx[:, None]
        else:
            diff = fidx[:, None] - fidx[None, :]
        decay_mask = tl.where(diff >= 0, tl.exp(ld * tl.maximum(diff, 0.0)), 0.0)

        if HAS_INIT:
            x_ptrs = Init + n64 * s_in + h64 * s_ih + ra[:, None] * s_ir + rc[None, :] * s_ic
            X = tl.load(x_ptrs, mask=m2, other=0.0).to(tl.float32)
        else:
            X = tl.full((BA, BC), 0.0, tl.float32)

        nchunks = (L + CH - 1) // CH
        c0 = seg * SEGC
        c1 = tl.minimum(c0 + SEGC, nchunks)
        seg_tokens = SEGC * CH
        # edge: the segment that holds the sequence's first token in walking order (where X0 applies)
        if REVERSE:
            edge = seg == NSEG - 1
            terminal = seg == 0
        else:
            edge = seg == 0
            terminal = seg == NSEG - 1
        if USE_U and PREFIX:
            # U holds the state entering each segment itself (saved by the look-back forward)
            X = tl.load(u_base + seg * s_us + u_tile, mask=m2, other=0.0)
        elif USE_U:
            # the state entering this segment, from the per-segment sums U of the segments walked before it
            if REVERSE:
                last_tokens = L - (NSEG - 1) * seg_tokens
                for r in range(0, NSEG - 1 - seg):
                    s_prev = NSEG - 1 - r
                    # X0 sits at the last token: it decays one step less than a state entering from beyond it
                    dec = tl.where(r == 0, tl.exp(ld * (last_tokens - 1.0)), tl.exp(ld * seg_tokens))
                    X = X * dec + tl.load(u_base + s_prev * s_us + u_tile, mask=m2, other=0.0)
            else:
                for s_prev in range(0, seg):
                    X = X * tl.exp(ld * seg_tokens) + tl.load(u_base + s_prev * s_us + u_tile, mask=m2, other=0.0)

        for i in range(c1 - c0):
            if REVERSE:
                ci = c1 - 1 - i
            else:
                ci = c0 + i
            start = ci * CH
            t = start + idx
            mt = t < L
            if OFF32:  # row offsets fit in int32: fewer registers for the addresses
                rows = bos.to(tl.int32) + t
            else:
                rows = bos + t.to(tl.int64)
            b = tl.load(b_base + rows[:, None] * s_bt + ra[None, :], mask=mt[:, None] & ma[None, :], other=0.0)
            c = tl.load(c_base + rows[:, None] * s_ct + rc[None, :], mask=mt[:, None] & mc[None, :], other=0.0)
            clen = tl.minimum(L - start, CH).to(tl.float32)
            if REVERSE:
                # the first chunk walked holds the last token, whose state is X0 itself (no decay step before it)
                if STATE_ONLY:
                    shift = 0.0
                else:
                    shift = tl.where((i == 0) & edge, 1.0, 0.0)
                a_decay = tl.exp(ld * tl.maximum(clen - fidx - shift, 0.0))
                b_decay = tl.exp(ld * fidx)
                x_decay = tl.exp(ld * (clen - shift))
            else:
                a_decay = tl.exp(ld * (fidx + 1.0))
                b_decay = tl.exp(ld * tl.maximum(clen - 1.0 - fidx, 0.0))
                x_decay = tl.exp(ld * clen)
            b_decay = tl.where(mt, b_decay * scale_state, 0.0)

            if not STATE_ONLY:
                a = tl.load(a_base + rows[:, None] * s_at + ra[None, :], mask=mt[:, None] & ma[None, :], other=0.0)
                a_decay = tl.where(mt, a_decay, 0.0)
                o_ptrs = o_base + rows[:, None] * s_ot + rc[None, :]
                if INTER_FIRST:
                    # the carried-state term first, its row decay applied to the product (no decayed copy of a),
                    # then the intra-chunk term accumulated into it
                    if STATE_LOWP:
                        acc = tl.dot(a, X.to(c.dtype))
                    else:
                        acc = tl.dot(a.to(tl.float32), X)
                    acc = acc * (a_decay * scale_out)[:, None]
                    scores = tl.dot(a, tl.trans(b)) * (decay_mask * (scale_state * scale_out))
                    acc = tl.dot(scores.to(c.dtype), c, acc)
                    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mt[:, None] & mc[None, :])
                else:
                    scores = tl.dot(a, tl.trans(b)) * (decay_mask * scale_state)
                    acc = tl.dot(scores.to(c.dtype), c)
                    a_dec = a.to(tl.float32) * a_decay[:, None]
                    if STATE_LOWP:
                        acc += tl.dot(a_dec.to(c.dtype), X.to(c.dtype))
                    else:
                        acc += tl.dot(a_dec, X)
                    tl.store(o_ptrs, (acc * scale_out).to(Out.dtype.element_ty), mask=mt[:, None] & mc[None, :])

            b_dec = (b.to(tl.float32) * b_decay[:, None]).to(c.dtype)
            if INTER_FIRST:
                X = tl.dot(tl.trans(b_dec), c, X * x_decay)
            else:
                X = X * x_decay + tl.dot(tl.trans(b_dec), c)

        if STATE_ONLY:
            tl.store(u_base + seg * s_us + u_tile, X, mask=m2)
        elif STORE_FINAL:
            if REVERSE:
                # gradient of the state *before* the first token: one more decay step
                X = X * tl.where(nchunks > 0, tl.exp(ld), 1.0)
            if terminal:
                f_ptrs = Final + n64 * s_fn + h64 * s_fh + ra[:, None] * s_fr + rc[None, :] * s_fc
                tl.store(f_ptrs, X, mask=m2)

    @triton.jit
    def _state_tile(pid, pid_c, H, DK, DV, BK: tl.constexpr, BC: tl.constexpr):
        # Program (sequence * H + head, column tile pid_c) -> its sequence and head (int64), the key rows and value
        # columns of its state tile, and their masks.
        n64 = (pid // H).to(tl.int64)
        h64 = (pid % H).to(tl.int64)
        rk = tl.arange(0, BK)
        rc = pid_c * BC + tl.arange(0, BC)
        mk = rk < DK
        mc = rc < DV
        return n64, h64, rk, rc, mk, mc, mk[:, None] & mc[None, :]

    @triton.jit
    def _program_tile(r, Q, K, V, Out, LogDecay, H, DK, DV, NCOL, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh, s_pn,
                      s_ph, s_pr, CH: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
        # What a program of the ticketed forwards works on, from r = its (sequence * H + head) * NCOL + column tile:
        # sequence and head, the key rows and value columns of its state tile with their masks, the chunk's token
        # offsets, the head's log decay, the base pointers of q, k, v, o, and the offsets of its tile in the
        # per-segment state buffers (Agg, Incl, Pref).
        pid = r // NCOL
        n64, h64, rk, rc, mk, mc, m2 = _state_tile(pid, r % NCOL, H, DK, DV, BK, BC)
        idx = tl.arange(0, CH)
        fidx = idx.to(tl.float32)
        ld = tl.load(LogDecay + pid % H).to(tl.float32)
        q_base = Q + n64 * s_qb + h64 * s_qh
        k_base = K + n64 * s_kb + h64 * s_kh
        v_base = V + n64 * s_vb + h64 * s_vh
        o_base = Out + n64 * s_ob + h64 * s_oh
        st_base = n64 * s_pn + h64 * s_ph
        st_tile = rk[:, None] * s_pr + rc[None, :]
        return n64, h64, rk, rc, mk, mc, m2, idx, fidx, ld, q_base, k_base, v_base, o_base, st_base, st_tile

    @triton.jit
    def _initial_state(Init, n64, h64, s_in, s_ih, s_ir, s_ic, rk, rc, m2, BK: tl.constexpr, BC: tl.constexpr,
                       HAS_INIT: tl.constexpr):
        # the state entering a sequence's first segment: its tile of the initial state, or zero
        if HAS_INIT:
            P = tl.load(Init + n64 * s_in + h64 * s_ih + rk[:, None] * s_ir + rc[None, :] * s_ic, mask=m2,
                        other=0.0).to(tl.float32)
        else:
            P = tl.full((BK, BC), 0.0, tl.float32)
        return P

    @triton.jit
    def _segment_sum(k_base, v_base, s_kt, s_vt, rk, rc, mk, mc, c0, idx, fidx, ld,
                     BK: tl.constexpr, BC: tl.constexpr, SEGC, CH: tl.constexpr, OFF32: tl.constexpr,
                     EV_KEEP: tl.constexpr, DECAY_V: tl.constexpr, SUM_STAGES: tl.constexpr):
        """U = the decayed sum of k^T v over the SEGC whole chunks from chunk c0 (a segment before the last)."""
        b_decay = tl.exp(ld * (CH - 1.0 - fidx))
        x_decay = tl.exp(ld * (CH * 1.0))
        U = tl.full((BK, BC), 0.0, tl.float32)
        for i in tl.range(0, SEGC, num_stages=SUM_STAGES):
            if OFF32:
                rows = (c0 + i) * CH + idx
            else:
                rows = ((c0 + i) * CH + idx).to(tl.int64)
            kk = tl.load(k_base + rows[:, None] * s_kt + rk[None, :], mask=mk[None, :], other=0.0,
                         eviction_policy=EV_KEEP)
            vv = tl.load(v_base + rows[:, None] * s_vt + rc[None, :], mask=mc[None, :], other=0.0,
                         eviction_policy=EV_KEEP)
            if DECAY_V:  # the decay on the (narrower) v tile; k^T straight from shared memory
                v_dec = (vv.to(tl.float32) * b_decay[:, None]).to(vv.dtype)
                U = tl.dot(tl.trans(kk), v_dec, U * x_decay)
            else:
                k_dec = (kk.to(tl.float32) * b_decay[:, None]).to(vv.dtype)
                U = U * x_decay + tl.dot(tl.trans(k_dec), vv)
        return U

    @triton.jit
    def _add_predecessors(P, flag_base, Agg, Incl, st_base, s_ps, st_tile, m2, seg, seg_decay):
        """The decoupled look-back: walking back from segment seg - 1, add a finished segment's end state (flag 2,
        in Incl) and stop, or an unfinished one's own sum (flag 1, in Agg), decayed, and go on; flag 0: wait."""
        j = seg - 1
        w = seg_decay * 0.0 + 1.0
        while j >= 0:
            f = tl.atomic_add(flag_base + j, 0, sem="acquire")
            while f == 0:
                f = tl.atomic_add(flag_base + j, 0, sem="acquire")
            if f == 2:
                P += w * tl.load(Incl + st_base + j * s_ps + st_tile, mask=m2, other=0.0, cache_modifier=".cg")
                j = j - j - 1
            else:
                P += w * tl.load(Agg + st_base + j * s_ps + st_tile, mask=m2, other=0.0, cache_modifier=".cg")
                w = w * seg_decay
                j -= 1
        return P

    @triton.jit
    def _walk_segment(X, q_base, k_base, v_base, o_base, s_qt, s_kt, s_vt, s_ot, rk, rc, mk, mc, c0, c1, T, ld,
                      scale, idx, fidx, Out, CH: tl.constexpr, OFF32: tl.constexpr, EV_DROP: tl.constexpr,
                      EV_QK: tl.constexpr,
                      STATE_LOWP: tl.constexpr, DECAY_V: tl.constexpr):
        """Walk chunks c0..c1-1 from the state X entering them, writing o = scale * (intra-chunk part + decayed
        q X); returns the state after them."""
        diff = fidx[:, None] - fidx[None, :]
        decay_mask = tl.where(diff >= 0, tl.exp(ld * tl.maximum(diff, 0.0)), 0.0)
        a_decay0 = tl.exp(ld * (fidx + 1.0))
        for ci in range(c0, c1):
            start = ci * CH
            t = start + idx
            mt = t < T
            if OFF32:
                rows = t
            else:
                rows = t.to(tl.int64)
            kk = tl.load(k_base + rows[:, None] * s_kt + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0,
                         eviction_policy=EV_QK)
            vv = tl.load(v_base + rows[:, None] * s_vt + rc[None, :], mask=mt[:, None] & mc[None, :], other=0.0,
                         eviction_policy=EV_DROP)
            qq = tl.load(q_base + rows[:, None] * s_qt + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0,
                         eviction_policy=EV_QK)
            clen = tl.minimum(T - start, CH).to(tl.float32)
            b_decay = tl.where(mt, tl.exp(ld * tl.maximum(clen - 1.0 - fidx, 0.0)), 0.0)
            a_decay = tl.where(mt, a_decay0, 0.0)
            # inter-chunk part first, its row decay applied to the product (no decayed copy of q)
            if STATE_LOWP:
                acc = tl.dot(qq, X.to(vv.dtype))
            else:
                acc = tl.dot(qq.to(tl.float32), X)
            acc = acc * (a_decay * scale)[:, None]
            scores = tl.dot(qq, tl.trans(kk)) * (decay_mask * scale)
            acc = tl.dot(scores.to(vv.dtype), vv, acc)
            tl.store(o_base + rows[:, None] * s_ot + rc[None, :], acc.to(Out.dtype.element_ty),
                     mask=mt[:, None] & mc[None, :], eviction_policy=EV_DROP)
            if DECAY_V:
                v_dec = (vv.to(tl.float32) * b_decay[:, None]).to(vv.dtype)
                X = tl.dot(tl.trans(kk), v_dec, X * tl.exp(ld * clen))
            else:
                k_dec = (kk.to(tl.float32) * b_decay[:, None]).to(vv.dtype)
                X = tl.dot(tl.trans(k_dec), vv, X * tl.exp(ld * clen))
        return X

    @triton.jit
    def _fwd_lookback_kernel(
        Q, K, V, Out, Init, Final, Agg, Incl, Pref, Flags, LogDecay,
        T, H, DK, DV, NSEG, SEGC, NCOL, NHC,
        s_qb, s_qh, s_qt,
        s_kb, s_kh, s_kt,
        s_vb, s_vh, s_vt,
        s_ob, s_oh, s_ot,
        s_in, s_ih, s_ir, s_ic,
        s_fn, s_fh, s_fr, s_fc,
        s_pn, s_ph, s_ps, s_pr,
        scale,
        CH: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
        HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, SAVE_PREFIX: tl.constexpr, STATE_LOWP: tl.constexpr,
        EV_KEEP: tl.constexpr, EV_DROP: tl.constexpr, EV_QK: tl.constexpr, PUBLISH_INCL: tl.constexpr,
        OFF32: tl.constexpr,
    ):
        # Work order from a ticket, not from the program id: a program only ever waits on lower tickets, which
        # belong to programs that are already running (or done), so the waits cannot deadlock whatever order the
        # hardware (or the interpreter) starts programs in. Segments vary slowest: all heads' segment s come before
        # any segment s + 1.
        ticket = tl.atomic_add(Flags + NHC * NSEG, 1)
        seg = ticket // NHC
        r = ticket % NHC
        flag_base = Flags + r * NSEG
        n64, h64, rk, rc, mk, mc, m2, idx, fidx, ld, q_base, k_base, v_base, o_base, st_base, st_tile = _program_tile(
            r, Q, K, V, Out, LogDecay, H, DK, DV, NCOL, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh, s_pn, s_ph,
            s_pr, CH, BK, BC)

        nchunks = (T + CH - 1) // CH
        c0 = seg * SEGC
        c1 = tl.minimum(c0 + SEGC, nchunks)
        seg_decay = tl.exp(ld * (SEGC * CH))
        notlast = seg < NSEG - 1

        # 1. this segment's own sum of decayed k^T v (segments before the last are whole: SEGC full chunks)
        U = tl.full((BK, BC), 0.0, tl.float32)
        if notlast:
            U = _segment_sum(k_base, v_base, s_kt, s_vt, rk, rc, mk, mc, c0, idx, fidx, ld, BK, BC, SEGC, CH, OFF32,
                             EV_KEEP, False, None)

        # 2. the state entering the segment: decoupled look-back over the segments before it. Flag 1: the
        # segment's own sum is in Agg; flag 2: the state at its end (inclusive prefix) is in Incl.
        if seg == 0:
            P = _initial_state(Init, n64, h64, s_in, s_ih, s_ir, s_ic, rk, rc, m2, BK, BC, HAS_INIT)
        else:
            P = tl.full((BK, BC), 0.0, tl.float32)
            f = tl.atomic_add(flag_base + seg - 1, 0, sem="acquire")
            if PUBLISH_INCL:
                publish_agg = (f != 2) & notlast
            else:
                publish_agg = notlast
            if publish_agg:
                # the predecessor is not finished: let successors see our own sum meanwhile
                tl.store(Agg + st_base + seg * s_ps + st_tile, U, mask=m2)
                tl.debug_barrier()
                tl.atomic_xchg(flag_base + seg, 1, sem="release")
            P = _add_predecessors(P, flag_base, Agg, Incl, st_base, s_ps, st_tile, m2, seg, seg_decay)
        if PUBLISH_INCL:
            publish_incl = notlast
        else:
            publish_incl = notlast & (seg == 0)
        if publish_incl:
            tl.store(Incl + st_base + seg * s_ps + st_tile, P * seg_decay + U, mask=m2)
            tl.debug_barrier()
            tl.atomic_xchg(flag_base + seg, 2, sem="release")
        if SAVE_PREFIX:
            tl.store(Pref + st_base + seg * s_ps + st_tile, P, mask=m2)

        # 3. walk the segment's chunks from that state
        X = _walk_segment(P, q_base, k_base, v_base, o_base, s_qt, s_kt, s_vt, s_ot, rk, rc, mk, mc, c0, c1, T, ld,
                          scale, idx, fidx, Out, CH, OFF32, EV_DROP, EV_QK, STATE_LOWP, False)
        if STORE_FINAL:
            if seg == NSEG - 1:
                tl.store(Final + n64 * s_fn + h64 * s_fh + rk[:, None] * s_fr + rc[None, :] * s_fc, X, mask=m2)

    @triton.jit
    def _fwd_overlap_kernel(
        Q, K, V, Out, Init, Final, Agg, Incl, Pref, Flags, LogDecay,
        T, H, DK, DV, NSEG, SEGC, NCOL, NHC, LEAD,
        s_qb, s_qh, s_qt,
        s_kb, s_kh, s_kt,
        s_vb, s_vh, s_vt,
        s_ob, s_oh, s_ot,
        s_in, s_ih, s_ir, s_ic,
        s_fn, s_fh, s_fr, s_fc,
        s_pn, s_ph, s_ps, s_pr,
        scale,
        CH: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
        HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, SAVE_PREFIX: tl.constexpr, STATE_LOWP: tl.constexpr,
        EV_KEEP: tl.constexpr, EV_DROP: tl.constexpr, EV_QK: tl.constexpr, PUBLISH_INCL: tl.constexpr,
        OFF32: tl.constexpr,
        DECAY_V: tl.constexpr, SUM_STAGES: tl.constexpr,
    ):
        # One launch, two kinds of program, in the order of a ticket counter: S(s) sums segment s's decayed k^T v
        # into Agg and raises its flag to 1; W(s) obtains the state entering segment s (look-back over the flags),
        # publishes the state at its end in Incl (flag 2), then walks the segment and writes o. Ticket order, for
        # LEAD = 1: S(0), S(1), W(0), S(2), W(1), S(3), W(2), ...: bandwidth-bound sums run beside latency-bound
        # walks, and W(s) re-reads the k, v that S(s) read shortly before (kept in L2 by the evict-last hint). W(s)
        # waits only for S(j <= s), which hold lower tickets and never wait themselves: no deadlock in any order
        # the programs start in.
        ticket = tl.atomic_add(Flags + NHC * NSEG, 1)
        grp = ticket // NHC
        r = ticket % NHC
        n_sum = NSEG - 1  # the last segment's sum is never needed
        lead = tl.minimum(LEAD, n_sum)
        n_pair = n_sum - lead
        kk = grp - lead
        in_pairs = (kk >= 0) & (kk < 2 * n_pair)
        is_sum = (grp < lead) | (in_pairs & (kk % 2 == 0))
        seg = tl.where(grp < lead, grp,
                       tl.where(in_pairs, tl.where(kk % 2 == 0, lead + kk // 2, kk // 2), kk - n_pair))
        flag_base = Flags + r * NSEG
        n64, h64, rk, rc, mk, mc, m2, idx, fidx, ld, q_base, k_base, v_base, o_base, st_base, st_tile = _program_tile(
            r, Q, K, V, Out, LogDecay, H, DK, DV, NCOL, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh, s_pn, s_ph,
            s_pr, CH, BK, BC)
        nchunks = (T + CH - 1) // CH
        c0 = seg * SEGC
        seg_decay = tl.exp(ld * (SEGC * CH))
        notlast = seg < NSEG - 1

        if is_sum:
            # S(s): segments before the last are whole (SEGC full chunks)
            U = _segment_sum(k_base, v_base, s_kt, s_vt, rk, rc, mk, mc, c0, idx, fidx, ld, BK, BC, SEGC, CH, OFF32,
                             EV_KEEP, DECAY_V, SUM_STAGES)
            tl.store(Agg + st_base + seg * s_ps + st_tile, U, mask=m2)
            tl.debug_barrier()
            tl.atomic_xchg(flag_base + seg, 1, sem="release")
        else:
            # W(s): the state entering the segment. Flag 1: the segment's own sum is in Agg; flag 2: the state at
            # its end is in Incl.
            if seg == 0:
                P = _initial_state(Init, n64, h64, s_in, s_ih, s_ir, s_ic, rk, rc, m2, BK, BC, HAS_INIT)
            else:
                P = _add_predecessors(tl.full((BK, BC), 0.0, tl.float32), flag_base, Agg, Incl, st_base, s_ps,
                                      st_tile, m2, seg, seg_decay)
            if PUBLISH_INCL:
                publish = notlast
            else:
                publish = notlast & (seg == 0)
            if publish:
                f = tl.atomic_add(flag_base + seg, 0, sem="acquire")
                while f == 0:
                    f = tl.atomic_add(flag_base + seg, 0, sem="acquire")
                U = tl.load(Agg + st_base + seg * s_ps + st_tile, mask=m2, other=0.0, cache_modifier=".cg")
                tl.store(Incl + st_base + seg * s_ps + st_tile, P * seg_decay + U, mask=m2)
                tl.debug_barrier()
                tl.atomic_xchg(flag_base + seg, 2, sem="release")
            if SAVE_PREFIX:
                tl.store(Pref + st_base + seg * s_ps + st_tile, P, mask=m2)

            # the walk
            X = _walk_segment(P, q_base, k_base, v_base, o_base, s_qt, s_kt, s_vt, s_ot, rk, rc, mk, mc, c0,
                              tl.minimum(c0 + SEGC, nchunks), T, ld, scale, idx, fidx, Out, CH, OFF32, EV_DROP, EV_QK,
                              STATE_LOWP, DECAY_V)
            if STORE_FINAL:
                if seg == NSEG - 1:
                    tl.store(Final + n64 * s_fn + h64 * s_fh + rk[:, None] * s_fr + rc[None, :] * s_fc, X, mask=m2)

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


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use lightning_reference instead of lightning_triton")


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dimension with unit stride; anything else gets copied."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _new_out(like: torch.Tensor, dc: int, dtype) -> torch.Tensor:
    """An empty (B, H, T, dc) output in the memory order of `like`: the model hands over (B, T, H, D) projections
    viewed as (B, H, T, D), and an output in that order makes its transpose + reshape back a free view."""
    B, H, T, _ = like.shape
    if like.stride(1) < like.stride(2):
        return torch.empty(B, T, H, dc, device=like.device, dtype=dtype).transpose(1, 2)
    return torch.empty(B, H, T, dc, device=like.device, dtype=dtype)


def _fits_int32(T: int, *tensors) -> bool:
    """Whether every offset inside one (sequence, head) slice (row * row stride + column) fits in int32."""
    return all(x is None or (T + 1) * x.stride(2) + x.shape[-1] < 2 ** 31 for x in tensors)


def _block_c(config: ScanConfig, da: int, dc: int) -> int:
    """Column tile: as asked, but no wider than the columns and small enough that the state tile (at most 128 x 128
    float32) stays in registers for large head dims."""
    bc = min(_pow2(config.block_c), _pow2(dc))
    while _pow2(da) * bc > 128 * 128 and bc > 16:
        bc //= 2
    return bc


def _segments(T: int, chunk: int, programs_per_segment: int, config: ScanConfig, varlen: bool) -> tuple[int, int]:
    """(number of segments, chunks per segment) along T. Packed documents keep one segment each."""
    nchunks = max(1, -(-T // chunk))
    if varlen:
        return 1, nchunks
    want = -(-config.target_programs // max(1, programs_per_segment))
    nseg = max(1, min(want, 64, nchunks // max(1, config.min_segment_chunks)))
    segc = -(-nchunks // nseg)
    return -(-nchunks // segc), segc


def _launch(a, b, c, log_decay, *, out, init, init_transposed, final, u, u_transposed, nseg, segc, grid_segs,
            seg_offset, reverse, state_only, scale_out, scale_state, cu_seqlens, chunk, config: ScanConfig,
            prefix=False):
    B, H, T, DA = b.shape
    DC = c.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    dummy = log_decay
    zeros3, zeros4 = (0, 0, 0), (0, 0, 0, 0)
    init_strides = zeros4
    if init is not None:
        sn, sh, sr, sc = init.stride()
        init_strides = (sn, sh, sc, sr) if init_transposed else (sn, sh, sr, sc)
    u_strides = (0, 0, 0, 0, 0)
    if u is not None:
        un, uh, us, ur, uc = u.stride()
        u_strides = (un, uh, us, uc, ur) if u_transposed else (un, uh, us, ur, uc)
    BA = _pow2(DA)
    BC = _block_c(config, DA, DC)
    grid = (N * H, triton.cdiv(DC, BC), grid_segs)
    _scan_chunks_kernel[grid](
        a, b, c, dummy if out is None else out, dummy if init is None else init, dummy if final is None else final,
        dummy if u is None else u, log_decay, dummy if cu_seqlens is None else cu_seqlens,
        T, H, DA, DC, nseg, segc, seg_offset,
        *(a.stride()[:3]), *(b.stride()[:3]), *(c.stride()[:3]), *(zeros3 if out is None else out.stride()[:3]),
        *init_strides, *(zeros4 if final is None else final.stride()), *u_strides,
        float(scale_out), float(scale_state),
        CH=chunk, BA=BA, BC=BC,
        HAS_INIT=init is not None and not state_only, STORE_FINAL=final is not None,
        VARLEN=cu_seqlens is not None, REVERSE=reverse, STATE_ONLY=state_only,
        # a bf16 copy of the state keeps bf16's range; fp16 could overflow on long, slowly decaying sequences
        STATE_LOWP=config.state_lowp and c.dtype == torch.bfloat16,
        USE_U=u is not None and not state_only and nseg > 1, PREFIX=prefix, OFF32=_fits_int32(T, a, b, c, out),
        INTER_FIRST=config.inter_first, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _segment_sums(b, c, log_decay, *, reverse, scale_state, nseg, segc, chunk, config):
    """First pass: U[n, h, s] = sum over segment s of decay * b^T c (decayed to the segment's far end in walking
    order), for every segment whose sum a later one needs. (N, H, NSEG, DA, DC) float32."""
    B, H, T, DA = b.shape
    u = torch.empty(B, H, nseg, DA, c.shape[-1], device=b.device, dtype=torch.float32)
    _launch(b, b, c, log_decay, out=None, init=None, init_transposed=False, final=None, u=u, u_transposed=False,
            nseg=nseg, segc=segc, grid_segs=nseg - 1, seg_offset=1 if reverse else 0, reverse=reverse,
            state_only=True, scale_out=1.0, scale_state=scale_state, cu_seqlens=None, chunk=chunk, config=config)
    return u


def _scan(a, b, c, log_decay, *, init, init_transposed, reverse, scale_out, scale_state, store_final, cu_seqlens,
          chunk, out_dtype, config: ScanConfig, nseg, segc, u=None, u_transposed=False, prefix=False, out_like=None):
    """One chunk scan (see the module docstring). a, b (B, H, T, DA); c (B, H, T, DC) -> out (B, H, T, DC), the last
    state (N, H, DA, DC) float32 when asked, and the segment sums used (None with one segment). With `prefix`, `u`
    holds the state entering each segment rather than the segment's own sum. `out` takes the memory order of
    `out_like` (default: a)."""
    B, H, T, DA = a.shape
    DC = c.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if nseg > 1 and u is None:
        u = _segment_sums(b, c, log_decay, reverse=reverse, scale_state=scale_state, nseg=nseg, segc=segc,
                          chunk=chunk, config=config)
        u_transposed = False
    out = _new_out(out_like if out_like is not None else a, DC, out_dtype)
    final = torch.empty(N, H, DA, DC, device=a.device, dtype=torch.float32) if store_final else None
    _launch(a, b, c, log_decay, out=out, init=init, init_transposed=init_transposed, final=final, u=u,
            u_transposed=u_transposed, nseg=nseg, segc=segc, grid_segs=nseg, seg_offset=0, reverse=reverse,
            state_only=False, scale_out=scale_out, scale_state=scale_state, cu_seqlens=cu_seqlens, chunk=chunk,
            config=config, prefix=prefix)
    return out, final, u


def _lookback_segments(T: int, chunk: int, config: ScanConfig) -> tuple[int, int]:
    segc = max(1, config.segment_tokens // chunk)
    nchunks = max(1, -(-T // chunk))
    return -(-nchunks // segc), segc


def _ticketed_forward(q, k, v, log_decay, *, init, scale, store_final, save_prefix, chunk, config: ScanConfig):
    """The one-launch forwards (no cu_seqlens): the overlap kernel when `config.overlap`, else the look-back kernel.
    Returns o, the final state (or None), the state entering each segment (N, H, NSEG, Dk, Dv) float32 when
    `save_prefix` (else None), (nseg, segc) and the flags (one per program and segment, then the ticket counter)."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    nseg, segc = _lookback_segments(T, chunk, config)
    BK = _pow2(DK)
    BC = _block_c(config, DK, DV)
    ncol = triton.cdiv(DV, BC)
    nhc = B * H * ncol
    dev = q.device
    out = _new_out(q, DV, q.dtype)
    final = torch.empty(B, H, DK, DV, device=dev, dtype=torch.float32) if store_final else None
    flags = torch.zeros(nhc * nseg + 1, device=dev, dtype=torch.int32)  # one flag per program, then the ticket counter
    # Agg / Incl: each segment's own sum and the state at its end (the last segment publishes neither); Pref: the
    # state entering each segment, kept for the backward. All (N, H, NSEG, Dk, Dv) float32, contiguous.
    shape = (B, H, nseg, DK, DV)
    agg = torch.empty(shape, device=dev, dtype=torch.float32) if nseg > 1 else None
    incl = torch.empty(shape, device=dev, dtype=torch.float32) if nseg > 1 else None
    pref = torch.empty(shape, device=dev, dtype=torch.float32) if save_prefix else None
    st_strides = (H * nseg * DK * DV, nseg * DK * DV, DK * DV, DV)
    dummy = log_decay
    hints = config.l2_hints
    head = (q, k, v, out, dummy if init is None else init, dummy if final is None else final,
            dummy if agg is None else agg, dummy if incl is None else incl, dummy if pref is None else pref, flags,
            log_decay, T, H, DK, DV, nseg, segc, ncol, nhc)
    tail = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            *((0, 0, 0, 0) if init is None else init.stride()), *((0, 0, 0, 0) if final is None else final.stride()),
            *st_strides, float(scale))
    consts = dict(
        CH=chunk, BK=BK, BC=BC, HAS_INIT=init is not None, STORE_FINAL=final is not None,
        SAVE_PREFIX=pref is not None, STATE_LOWP=config.state_lowp and v.dtype == torch.bfloat16,
        EV_KEEP="evict_last" if hints else "", EV_DROP="evict_first" if hints else "",
        EV_QK=config.walk_qk_hint if hints else "",
        PUBLISH_INCL=config.publish_inclusive, OFF32=_fits_int32(T, q, k, v, out),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.overlap:  # nseg - 1 sum programs and nseg walk programs per (sequence, head, column tile)
        _fwd_overlap_kernel[(nhc * (2 * nseg - 1),)](
            *head, max(0, int(config.lead)), *tail, DECAY_V=config.decay_v,
            SUM_STAGES=config.sum_stages or config.num_stages, **consts)
    else:
        _fwd_lookback_kernel[(nhc * nseg,)](*head, *tail, **consts)
    return out, final, pref, (nseg, segc), flags


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


def _check(q, k, v, log_decay, initial_state, cu_seqlens, chunk_size):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be (B, H, T, Dk) and v (B, H, T, Dv); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H = q.shape[:2]
    if log_decay.shape != (H,):
        raise ValueError(f"log_decay must have shape ({H},), got {tuple(log_decay.shape)}")
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"chunk_size must be 16, 32, 64 or 128 for the Triton kernel, got {chunk_size}")
    if cu_seqlens is not None and B != 1:
        raise ValueError("cu_seqlens needs batch size 1 (documents packed along the time axis)")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, H, q.shape[-1], v.shape[-1]):
        raise ValueError(f"initial_state must have shape {(N, H, q.shape[-1], v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")


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
