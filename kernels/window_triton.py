"""The Lightning layers' window branch in Triton: softmax attention over a sliding window plus attention sinks.

Computes `window_reference.window_attention` (same arguments; that file is the spec): query i reads key j of its own
sequence when j <= i and (i - j < window or j is among the sequence's first `sinks`).

- The band (keys of the query's own sequence at most `window - 1` back) runs in flash-attention-style kernels: one
  program per (block of queries, query head) walks the few key blocks the band touches (window / block + 2), fp32
  softmax and accumulation in exp2 arithmetic, and writes the output and each row's log-sum-exp. Backward: dq per
  query block, dk / dv per key block over the query blocks that read it (per query head; a GQA group's heads are summed
  after), no atomics. Packed documents and left padding enter as one `begin` per token (where its sequence begins):
  a key is in the band only where its begin equals the query's.
- The sinks are at most `sinks` keys per query (its sequence's first, where they lie before its band), read in the
  same kernels: a block's rows reading sinks belong to few sequences (one from window >= block - 1 on, the recipe's
  case), so their sinks form one small key tile per block (sequences x sinks keys, masked per row by its begin),
  scored and folded into the same online softmax as the band, and the log-sum-exp covers both (autograd sees one
  attention). The dq kernel takes the tile's dq and also sums each tile key's dk / dv over the block's rows, as the
  dk / dv kernel does per key block; those (blocks x tile) sums are added onto the sink rows in float32 after it
  (torch's scatter-add, atomic on CUDA, of T / block + documents sums per sink row: the readers of one sink row run
  to the end of its document, which no one program walks). A pair is band or sink, never both, so each is counted once.
- With `far` (window_reference's: the sinks beyond a reach scored by another pair) the kernels run the band alone
  and the sinks are gathered and scored in PyTorch (O(T * sinks) work), merged with the band through its
  log-sum-exp, so autograd covers them; the band's backward takes the log-sum-exp's gradient as well
  (ds = p * (dp - rowsum(do * o) + dlse)).

Where the SDPA form (window_reference.window_attention) builds blocks of 2 * window + sinks keys per block of window
queries and a boolean mask over all of them, this reads each key block a few times and no mask.
This file imports torch, triton (inside try so that machines without it can still import the model) and its sibling
kernel files (window_reference.py; sparse_common.py for the float32-exact product).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is missing
    HAS_TRITON = False

try:  # exported model folder
    from .window_reference import _check, sequence_begin
except ImportError:  # the hybridize package
    from hybridize.kernels.window_reference import _check, sequence_begin

__all__ = ["HAS_TRITON", "window_attention_triton"]

LOG2E = 1.4426950408889634


if HAS_TRITON:
    # float32 inputs (tests, fp32 runs) multiplied at float32 accuracy, bf16 / fp16 on the tensor cores
    try:
        from .sparse_common import _dot
    except ImportError:
        from hybridize.kernels.sparse_common import _dot

    # reductions through tl.reduce with combiners of this file: triton's own tl.sum / tl.max are jit functions
    # built when triton is imported, which the interpreter (tests) cannot call unless it was on at that import

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _maxf(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _tile(PTR, base, idx, stride, dims, T, D):
        """Rows `idx` (masked past T) and columns `dims` (masked past D) of a (T, D) slice at PTR + base."""
        return tl.load(PTR + base + idx[:, None] * stride + dims[None, :],
                       mask=(idx < T)[:, None] & (dims < D)[None, :], other=0.0)

    @triton.jit
    def _in_band(i, j, begin_i, begin_j, W):
        # query i reads key j through the band: causal, fewer than W back, the same sequence (rows past T carry
        # begin -1 and columns past T -2, so they match nothing)
        return (j <= i) & (i - j < W) & (begin_j == begin_i)

    @triton.jit
    def _fold(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
        """Base-2 scores s (rows x keys, -inf where not read) and the keys' values v into the running softmax."""
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _maxf))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        return m_new, l_i * alpha + tl.reduce(p, 1, _add), acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)

    @triton.jit
    def _sequences(rows, bq, row_ok, W, m0):
        # the rows reading a sink (sink 0 at least: W or more past their begin) and the index, among the sequences
        # with such rows in this block, of each one's sequence: each such sequence has one first reading row here
        # (the block's first row or its begin + W), so that index is the count of first rows up to the row, less one
        reads = row_ok & (rows - bq >= W)
        first = reads & ((rows - bq == W) | (rows == m0))
        return first, tl.associative_scan(first.to(tl.int32), 0, _add) - 1

    @triton.jit
    def _sink_tile(K, V, base, keys, first, seq, rows, bq, row_ok, s_kt, dims, D, W, S: tl.constexpr, NS):
        # a tile of sink keys shared by the block's rows: key c is sink c % S of the block's (c // S)-th sequence
        # reading sinks (c < NS). Returns their positions (0 where unused), keys, values, and which row reads which:
        # its own sequence's, before its band (so a pair is never both band and sink)
        kb = tl.reduce(tl.where((seq[None, :] == (keys // S)[:, None]) & first[None, :], bq[None, :], -1), 1, _maxf)
        pos = kb + keys % S
        used = (kb >= 0) & (keys < NS)
        at, at_ok = base + pos[:, None] * s_kt + dims[None, :], used[:, None] & (dims < D)[None, :]
        ks = tl.load(K + at, mask=at_ok, other=0.0)
        vs = tl.load(V + at, mask=at_ok, other=0.0)
        reads = (bq[:, None] == kb[None, :]) & (pos[None, :] <= rows[:, None] - W) & (row_ok[:, None] & used[None, :])
        return tl.where(used, pos, 0), ks, vs, reads

    @triton.jit
    def _band_fwd_kernel(Q, K, V, BEG, O, LSE, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, T, H, GROUP, W, SCALE2,
                         BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                         IEEE: tl.constexpr, S: tl.constexpr, NSEG: tl.constexpr, NK: tl.constexpr):
        # S sinks per sequence (0: none), of at most NSEG sequences per block, in tiles of NK keys
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // GROUP
        rows = pid_m * BM + tl.arange(0, BM)
        dims = tl.arange(0, DP)
        row_ok = rows < T
        dim_ok = dims < D
        q = _tile(Q, b * s_qb + h * s_qh, rows, s_qt, dims, T, D)
        bq = tl.load(BEG + b * T + rows, mask=row_ok, other=-1)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BM], 0.0, dtype=tl.float32)
        acc = tl.full([BM, DP], 0.0, dtype=tl.float32)
        # the sinks into the same running softmax as the band: the log-sum-exp covers all a row reads, so autograd
        # sees one attention and there is nothing to merge
        first, seq = _sequences(rows, bq, row_ok, W, pid_m * BM)
        for c0 in range(0, NSEG * S, NK):
            _, ks, vs, ok = _sink_tile(K, V, b * s_kb + hk * s_kh, c0 + tl.arange(0, NK), first, seq, rows, bq,
                                       row_ok, s_kt, dims, D, W, S, NSEG * S)
            s = tl.where(ok, _dot(q, tl.trans(ks), IEEE) * SCALE2, float("-inf"))
            m_i, l_i, acc = _fold(s, vs, m_i, l_i, acc, IEEE)
        lo = (tl.maximum(pid_m * BM - W + 1, 0) // BN) * BN
        hi = tl.minimum((pid_m + 1) * BM, T)
        for n0 in range(lo, hi, BN):
            cols = n0 + tl.arange(0, BN)
            k = _tile(K, b * s_kb + hk * s_kh, cols, s_kt, dims, T, D)
            v = _tile(V, b * s_kb + hk * s_kh, cols, s_kt, dims, T, D)
            bk = tl.load(BEG + b * T + cols, mask=cols < T, other=-2)
            s = _dot(q, tl.trans(k), IEEE) * SCALE2
            s = tl.where(_in_band(rows[:, None], cols[None, :], bq[:, None], bk[None, :], W), s, float("-inf"))
            m_i, l_i, acc = _fold(s, v, m_i, l_i, acc, IEEE)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + b * s_qb + h * s_qh + rows[:, None] * s_qt + dims[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])
        # natural-log log-sum-exp of the scaled logits
        lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634
        tl.store(LSE + bh * T + rows, lse, mask=row_ok)

    @triton.jit
    def _band_bwd_dq_kernel(Q, K, V, BEG, DO, LSE, DELTA, DQ, DKS, DVS, POS, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, T,
                            H, GROUP, W, SCALE2, SCALE, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                            DP: tl.constexpr, IEEE: tl.constexpr, S: tl.constexpr, NSEG: tl.constexpr,
                            NK: tl.constexpr):
        # with sinks, also the sink keys' dk / dv from this block's rows: each sink tile's (NK, D) sums, as the band
        # writes them per key block, into DKS / DVS ((B, H, blocks, NSEG * S, D)) and the keys' positions into POS,
        # for the caller to add onto those rows (a sink row gets one sum per block whose rows read it)
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // GROUP
        rows = pid_m * BM + tl.arange(0, BM)
        dims = tl.arange(0, DP)
        row_ok = rows < T
        dim_ok = dims < D
        q = _tile(Q, b * s_qb + h * s_qh, rows, s_qt, dims, T, D)
        do = _tile(DO, b * s_qb + h * s_qh, rows, s_qt, dims, T, D)
        bq = tl.load(BEG + b * T + rows, mask=row_ok, other=-1)
        lse2 = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
        dq = tl.full([BM, DP], 0.0, dtype=tl.float32)
        first, seq = _sequences(rows, bq, row_ok, W, pid_m * BM)
        for c0 in range(0, NSEG * S, NK):
            keys = c0 + tl.arange(0, NK)
            pos, ks, vs, ok = _sink_tile(K, V, b * s_kb + hk * s_kh, keys, first, seq, rows, bq, row_ok, s_kt, dims,
                                         D, W, S, NSEG * S)
            p = tl.where(ok, tl.exp2(_dot(q, tl.trans(ks), IEEE) * SCALE2 - lse2[:, None]), 0.0)
            ds = p * (_dot(do, tl.trans(vs), IEEE) - delta[:, None])
            dq += _dot(ds.to(ks.dtype), ks, IEEE)
            out = (bh * ((T + BM - 1) // BM) + pid_m) * (NSEG * S) + keys
            out_ok = keys < NSEG * S
            at, at_ok = out[:, None] * D + dims[None, :], out_ok[:, None] & dim_ok[None, :]
            tl.store(DKS + at, _dot(tl.trans(ds).to(q.dtype), q, IEEE) * SCALE, mask=at_ok)
            tl.store(DVS + at, _dot(tl.trans(p).to(do.dtype), do, IEEE), mask=at_ok)
            tl.store(POS + out, pos, mask=out_ok)
        lo = (tl.maximum(pid_m * BM - W + 1, 0) // BN) * BN
        hi = tl.minimum((pid_m + 1) * BM, T)
        for n0 in range(lo, hi, BN):
            cols = n0 + tl.arange(0, BN)
            k = _tile(K, b * s_kb + hk * s_kh, cols, s_kt, dims, T, D)
            v = _tile(V, b * s_kb + hk * s_kh, cols, s_kt, dims, T, D)
            bk = tl.load(BEG + b * T + cols, mask=cols < T, other=-2)
            ok = _in_band(rows[:, None], cols[None, :], bq[:, None], bk[None, :], W)
            p = tl.where(ok, tl.exp2(_dot(q, tl.trans(k), IEEE) * SCALE2 - lse2[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        dq_ptr = DQ + b * s_qb + h * s_qh + rows[:, None] * s_qt + dims[None, :]
        tl.store(dq_ptr, (dq * SCALE).to(DQ.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _band_bwd_dkdv_kernel(Q, K, V, BEG, DO, LSE, DELTA, DK, DV, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, T, H, GROUP,
                              W, SCALE2, SCALE, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                              DP: tl.constexpr, IEEE: tl.constexpr):
        # dk, dv per query head (DK, DV laid out like Q): the group's heads are summed by the caller
        pid_n, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // GROUP
        cols = pid_n * BN + tl.arange(0, BN)
        dims = tl.arange(0, DP)
        col_ok = cols < T
        dim_ok = dims < D
        k = _tile(K, b * s_kb + hk * s_kh, cols, s_kt, dims, T, D)
        v = _tile(V, b * s_kb + hk * s_kh, cols, s_kt, dims, T, D)
        bk = tl.load(BEG + b * T + cols, mask=col_ok, other=-2)
        dk = tl.full([BN, DP], 0.0, dtype=tl.float32)
        dv = tl.full([BN, DP], 0.0, dtype=tl.float32)
        lo = ((pid_n * BN) // BM) * BM
        hi = tl.minimum((pid_n + 1) * BN + W - 1, T)
        for m0 in range(lo, hi, BM):
            rows = m0 + tl.arange(0, BM)
            row_ok = rows < T
            q = _tile(Q, b * s_qb + h * s_qh, rows, s_qt, dims, T, D)
            do = _tile(DO, b * s_qb + h * s_qh, rows, s_qt, dims, T, D)
            bq = tl.load(BEG + b * T + rows, mask=row_ok, other=-1)
            lse2 = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
            ok = _in_band(rows[None, :], cols[:, None], bq[None, :], bk[:, None], W)
            pt = tl.where(ok, tl.exp2(_dot(k, tl.trans(q), IEEE) * SCALE2 - lse2[None, :]), 0.0)  # (BN, BM)
            dv += _dot(pt.to(do.dtype), do, IEEE)
            dpt = _dot(v, tl.trans(do), IEEE)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, IEEE)
        out_off = b * s_qb + h * s_qh + cols[:, None] * s_qt + dims[None, :]
        tl.store(DK + out_off, (dk * SCALE).to(DK.dtype.element_ty), mask=col_ok[:, None] & dim_ok[None, :])
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & dim_ok[None, :])


def _tiles(T: int, D: int) -> tuple[int, int, int]:
    block = 16 if T <= 16 else 64
    return block, block, max(16, triton.next_power_of_2(D))


def _sink_tiles(BM: int, window: int, sinks: int) -> tuple[int, int]:
    """How many sequences a block's rows reading sinks can belong to, and the sink tile's width for S sinks each.

    A row reads sinks only from `window` past its sequence's begin; every such sequence but the block's first
    begins inside the block after the one before it has a reading row there, so each next one lies at least
    window + 1 further: 1 + (BM - 1) // (window + 1) of them (one from window BM - 1 up)."""
    nseg = 1 + (BM - 1) // (window + 1)
    return nseg, min(64, max(16, triton.next_power_of_2(max(nseg * sinks, 1))))


class _Band(torch.autograd.Function):
    """The band and the first `sinks` keys of each sequence: (q, k, v, begin) -> (o, lse); lse (B, H, T) float32,
    natural log of the scaled logits. The PyTorch sinks (`far`) come with sinks=0: o and lse are the band's alone."""

    @staticmethod
    def forward(ctx, q, k, v, begin, window: int, scale: float, sinks: int = 0):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        group = H // k.shape[1]
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        BM, BN, DP = _tiles(T, D)
        nseg, nk = _sink_tiles(BM, window, sinks)
        _band_fwd_kernel[(triton.cdiv(T, BM), B * H)](
            q, k, v, begin, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            T, H, group, window, scale * LOG2E, BM=BM, BN=BN, D=D, DP=DP, IEEE=q.dtype == torch.float32, S=sinks,
            NSEG=nseg, NK=nk)
        ctx.save_for_backward(q, k, v, begin, o, lse)
        ctx.window, ctx.scale, ctx.sinks = window, scale, sinks
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, begin, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], ctx.sinks
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        delta = delta.contiguous()
        dq = torch.empty_like(q)
        dk = torch.empty(B, H, T, D, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        BM, BN, DP = _tiles(T, D)
        nseg, nk = _sink_tiles(BM, ctx.window, S)
        # the sink keys' dk / dv per block of queries (the dk / dv kernel covers the band's pairs only)
        dks = torch.empty(B, H, triton.cdiv(T, BM), nseg * S, D, device=q.device, dtype=torch.float32)
        dvs = torch.empty_like(dks)
        pos = torch.empty(B, H, triton.cdiv(T, BM), nseg * S, device=q.device, dtype=torch.int32)
        consts = dict(BM=BM, BN=BN, D=D, DP=DP, IEEE=q.dtype == torch.float32)
        args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), T, H, H // Hkv,
                ctx.window, ctx.scale * LOG2E, ctx.scale)
        _band_bwd_dq_kernel[(triton.cdiv(T, BM), B * H)](q, k, v, begin, do, lse, delta, dq, dks, dvs, pos, *args,
                                                         S=S, NSEG=nseg, NK=nk, **consts)
        _band_bwd_dkdv_kernel[(triton.cdiv(T, BN), B * H)](q, k, v, begin, do, lse, delta, dk, dv, *args, **consts)
        if S:
            # T / BM + (sequences) sums per sink row at most, added in float32 (unused tile keys add zeros to row 0)
            idx = pos.view(B, H, -1, 1).long().expand(B, H, -1, D)
            dk.scatter_add_(2, idx, dks.view(B, H, -1, D))
            dv.scatter_add_(2, idx, dvs.view(B, H, -1, D))
        dk = dk.view(B, Hkv, H // Hkv, T, D).sum(2).to(k.dtype)
        dv = dv.view(B, Hkv, H // Hkv, T, D).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None, None


class _SinkRows(torch.autograd.Function):
    """x (B, Hkv, T, D) -> x[..., begin[t] + s, :] for every token t and sink s, (B, Hkv, T, S, D) in float32.

    Its backward sums, for each sink row, the gradients of all the tokens that read it. Through gather's own backward
    that is an atomic add per token into the same few rows, in x's dtype: on an H200 at 16K tokens of one document,
    forward + backward took 229 ms (the SDPA form 2.9 ms), gradients off by up to 0.98 in bf16; with this, 16 ms and
    0.08 (bench/results/training.md, 2026-12-03; the model trains through the SDPA form). Here the
    tokens reading a row are one run (begin does not decrease along a row, and the run of sequence b starts at token
    b), so a float32 prefix sum gives each run's total, written once, at its last token."""

    @staticmethod
    def forward(ctx, x, begin, sinks: int):
        B, Hkv, T, D = x.shape
        pos = (begin[..., None] + torch.arange(sinks, device=x.device)).clamp(max=T - 1)  # (B, T, S)
        ctx.save_for_backward(begin, pos)
        ctx.dtype = x.dtype
        return x.gather(2, pos.view(B, 1, T * sinks, 1).expand(B, Hkv, -1, D)).view(B, Hkv, T, sinks, D).float()

    @staticmethod
    def backward(ctx, g):
        begin, pos = ctx.saved_tensors
        B, Hkv, T, S, D = g.shape
        # the prefix sum along the last dimension: along dim 2 of (B, Hkv, T, S, D) the GPU scans each of the
        # B * Hkv * S * D columns serially (on an H200 the 16 x 2K packed row's window call took 29.6 ms with it)
        c = g.float().permute(0, 1, 3, 4, 2).cumsum(-1).permute(0, 1, 4, 2, 3)
        before = (begin - 1).clamp(min=0).view(B, 1, T, 1, 1).expand(B, Hkv, T, S, D)
        run = c - torch.where((begin > 0).view(B, 1, T, 1, 1), c.gather(2, before), 0.0)
        last = torch.ones(B, T, dtype=torch.bool, device=g.device)
        last[:, :-1] = begin[:, 1:] != begin[:, :-1]
        # a run's total goes to its sink rows; every other token adds a zero to its own row (at most S + 1 adds
        # meet in one place)
        t = torch.arange(T, device=g.device).view(1, T, 1)
        idx = torch.where(last[..., None], pos, t).view(B, 1, T * S, 1).expand(B, Hkv, -1, D)
        dx = torch.zeros(B, Hkv, T, D, device=g.device, dtype=torch.float32)
        dx.scatter_add_(2, idx, (run * last.view(B, 1, T, 1, 1)).reshape(B, Hkv, T * S, D))
        return dx.to(ctx.dtype), None, None


def _sinks(q, k, v, begin, window: int, sinks: int, scale: float, far=None):
    """Per query, its sequence's first `sinks` keys that lie before its band: the unnormalised sum of their softmax
    terms against a per-row shift `m` (detached), their weighted values, and m. (B, Hkv, G, T, ...). `far`:
    window_reference's (q_far . k_far for the sinks beyond its reach)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    t = torch.arange(T, device=q.device)
    begin = begin.expand(B, T).contiguous()
    pos = begin[..., None] + torch.arange(sinks, device=q.device)  # (B, T, S)
    ok = pos <= (t[None, :, None] - window)
    ks = _SinkRows.apply(k, begin, sinks)
    vs = _SinkRows.apply(v, begin, sinks)
    logits = torch.einsum("bhgtd,bhtsd->bhgts", q.view(B, Hkv, H // Hkv, T, D).float(), ks) * scale
    if far is not None and T - 1 > far[0]:
        reach, qf, kf = far
        far_logits = torch.einsum("bhgtd,bhtsd->bhgts", qf.reshape(B, Hkv, H // Hkv, T, D).float(),
                                  _SinkRows.apply(kf.contiguous(), begin, sinks)) * scale
        beyond = (t[None, :, None] - pos > reach).view(B, 1, 1, T, sinks)
        logits = torch.where(beyond, far_logits, logits)
    ok = ok.view(B, 1, 1, T, sinks)
    # a large negative finite fill, not -inf: its exp is 0 and so is its gradient (no NaN through empty rows)
    logits = logits.masked_fill(~ok, -1e30)
    m = logits.amax(-1).detach().clamp(min=-1e4)
    e = torch.exp(logits - m[..., None])
    return e.sum(-1), torch.einsum("bhgts,bhtsd->bhgtd", e, vs), m


def window_attention_triton(q, k, v, window: int, sinks: int = 0, scale: float | None = None, *, cu_seqlens=None,
                            starts=None, far=None) -> torch.Tensor:
    """`window_reference.window_attention` on CUDA (or under the Triton interpreter): q (B, H, T, D), k and v
    (B, Hkv, T, D) -> (B, H, T, D). `cu_seqlens` (B == 1): packed documents; `starts`: left padding per row; `far`:
    window_reference's (the sinks beyond its reach, in the PyTorch part)."""
    _check(window, sinks, far)
    B, H, T, D = q.shape
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads are not a multiple of {k.shape[1]} key/value heads")
    scale = D ** -0.5 if scale is None else float(scale)
    begin = sequence_begin(B, T, q.device, cu_seqlens=cu_seqlens, starts=starts).expand(B, T)
    band, lse = _Band.apply(q, k, v, begin.to(torch.int32).contiguous(), window, scale, sinks if far is None else 0)
    if sinks and far is not None:
        Hkv = k.shape[1]
        total, weighted, m = _sinks(q, k, v, begin, window, sinks, scale, far)
        lse = lse.view(B, Hkv, H // Hkv, T)
        top = torch.maximum(lse, m).detach()
        wb, ws = torch.exp(lse - top), torch.exp(m - top)
        out = (band.view(B, Hkv, H // Hkv, T, D).float() * wb[..., None] + weighted * ws[..., None]) / (
            wb + total * ws)[..., None]
        band = out.view(B, H, T, D).to(q.dtype)
    if starts is not None:
        t = torch.arange(T, device=q.device)
        pad = t[None] < torch.as_tensor(starts, device=q.device).long().view(B, 1)
        band = band.masked_fill(pad[:, None, :, None], 0.0)
    return band
