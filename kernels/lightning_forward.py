"""Lightning attention in Triton: the one-launch forwards (look-back and overlap kernels, `_ticketed_forward`); see
the design notes in lightning_triton.py. The two-pass forward is the chunk scan of lightning_common.py.
"""

from __future__ import annotations

import torch

from .lightning_common import HAS_TRITON, ScanConfig, _block_c, _fits_int32, _new_out, _pow2, tl, triton

if HAS_TRITON:
    from .lightning_common import _state_tile

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


def _lookback_segments(T: int, chunk: int, config: ScanConfig, programs_per_segment: int = 1) -> tuple[int, int]:
    """(number of segments, chunks per segment): segments of `segment_tokens`, or shorter ones (down to
    `min_segment_chunks` chunks) where those would leave fewer than `target_programs` walks. A training batch of a
    small model (2 sequences of 8K tokens, 9 heads: 18 walks of 64 chunks) otherwise walks its chunks one after another
    on a mostly idle GPU; the shapes the segment length was tuned on (one sequence, 32 heads, 16K tokens and more)
    keep their segments."""
    segc = max(1, config.segment_tokens // chunk)
    nchunks = max(1, -(-T // chunk))
    want = -(-config.target_programs // max(1, programs_per_segment))
    if -(-nchunks // segc) < want:
        segc = min(segc, max(config.min_segment_chunks, -(-nchunks // want)))
    return -(-nchunks // segc), segc


def _ticketed_forward(q, k, v, log_decay, *, init, scale, store_final, save_prefix, chunk, config: ScanConfig):
    """The one-launch forwards (no cu_seqlens): the overlap kernel when `config.overlap`, else the look-back kernel.
    Returns o, the final state (or None), the state entering each segment (N, H, NSEG, Dk, Dv) float32 when
    `save_prefix` (else None), (nseg, segc) and the flags (one per program and segment, then the ticket counter)."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    BK = _pow2(DK)
    BC = _block_c(config, DK, DV)
    ncol = triton.cdiv(DV, BC)
    nhc = B * H * ncol
    nseg, segc = _lookback_segments(T, chunk, config, nhc)
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
