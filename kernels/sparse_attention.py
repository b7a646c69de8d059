"""InfLLM-V2 sparse Triton kernels, stage 3: block-sparse attention forward and backward over a `Selection`
(`block_sparse_attention_triton`). See sparse_triton.py.
"""

from __future__ import annotations

import torch

from .sparse_common import _LOG2E, HAS_TRITON, _launch_extra, _pow2, _tiles, tl, triton
from .sparse_select import Selection

if HAS_TRITON:
    from .sparse_common import _attend_step, _dot

    @triton.jit
    def _row_tile(QPOS, ROWS, row, sub, G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr):
        # Tile `sub` (BLOCK_T tokens) of a row: query index, validity, position of each (head, token) row.
        BM: tl.constexpr = GP * BLOCK_T
        t0 = tl.load(ROWS + row * 8)
        n = tl.load(ROWS + row * 8 + 1)
        r = tl.arange(0, BM)
        hh = r // BLOCK_T
        i = sub * BLOCK_T + r % BLOCK_T
        rm = (hh < G) & (i < n)
        pos = tl.load(QPOS + t0 + i, mask=rm, other=-1)
        return (t0 + i).to(tl.int64), rm, pos, hh, sub * BLOCK_T < n

    @triton.jit
    def _full_prefix(lst, cnt, pmin, pmax, BS: tl.constexpr, USE_BITS: tl.constexpr):
        # How many leading list entries every row of the tile sees whole (no causal or per-token mask): the ascending
        # list minus its entries from the tile's first own block on, checked on the last entry kept.
        if USE_BITS:
            n_full = cnt * 0
        else:
            n_full = tl.minimum(tl.maximum(cnt - (pmax // BS - pmin // BS + 1), 0), cnt)  # (empty tile: cnt = 0)
            last = tl.load(lst + tl.maximum(n_full - 1, 0))  # (every list has room for one entry)
            n_full = tl.where((n_full > 0) & (last * BS + BS - 1 <= pmin), n_full, 0)
        return n_full

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, QPOS, ROWS, LISTS, COUNTS, BITS,
        Hkv, sm_scale2,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
        s_Lb, s_Lh, s_Lr, s_nb, s_nh, s_bb, s_bh, s_bt,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, TPR: tl.constexpr, BS: tl.constexpr,
        D: tl.constexpr, USE_BITS: tl.constexpr, IEEE: tl.constexpr, PAIR: tl.constexpr, PIPE: tl.constexpr,
    ):
        # One program: one tile (BLOCK_T tokens x the group's heads) of one row and KV group; walks the row's block
        # list: first the blocks every row sees whole (no mask), then the rest with the causal / per-token mask.
        # Scores stay unscaled until one FMA: p = exp2(s * scale * log2(e) - m).
        pid = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        row = pid // TPR
        t64, rm, pos, hh, live = _row_tile(QPOS, ROWS, row, pid % TPR, G, GP, BLOCK_T)
        k0 = tl.load(ROWS + row * 8 + 2).to(tl.int64)
        pmax = tl.max(pos, 0)
        pmin = tl.min(tl.where(rm, pos, 1 << 30), 0)
        h = (g * G + hh).to(tl.int64)
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + h[:, None] * s_qh + t64[:, None] * s_qt + d[None, :], mask=rm[:, None], other=0.0)
        cnt = tl.load(COUNTS + b * s_nb + g * s_nh + row)
        cnt = tl.where(live, cnt, 0)
        lst = LISTS + b * s_Lb + g * s_Lh + row.to(tl.int64) * s_Lr
        n_full = _full_prefix(lst, cnt, pmin, pmax, BS, USE_BITS)
        kbase = K + b * s_kb + g * s_kh + k0 * s_kt
        vbase = V + b * s_vb + g * s_vh + k0 * s_vt
        BM: tl.constexpr = GP * BLOCK_T
        cidx = tl.arange(0, BS)
        m = tl.full([BM], -1.0e30, dtype=tl.float32)
        l = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
        n_pair = 0
        if PAIR:  # two listed blocks per step: one key tile of 2 * BS gathered keys
            n_pair = (n_full // 2) * 2
            c2 = tl.arange(0, 2 * BS)
            for it in range(0, n_pair, 2):
                jb2 = tl.load(lst + it + c2 // BS)
                sk64 = (jb2 * BS + c2 % BS).to(tl.int64)
                k = tl.load(kbase + sk64[:, None] * s_kt + d[None, :])
                v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :])
                s = _dot(q, tl.trans(k), IEEE)
                m, l, acc = _attend_step(s * sm_scale2, v, m, l, acc, IEEE)
        if PIPE:  # the next block's q k^T is issued before this block's softmax (overlap MMA and MUFU)
            jb = tl.load(lst + n_pair)
            live_k = n_pair < n_full
            sk64 = (jb * BS + cidx).to(tl.int64)
            s = _dot(q, tl.trans(tl.load(kbase + sk64[:, None] * s_kt + d[None, :],
                                         mask=cidx[:, None] < tl.where(live_k, BS, 0), other=0.0)), IEEE)
            for it in range(n_pair, n_full):
                more = it + 1 < n_full
                jbn = tl.load(lst + tl.where(more, it + 1, it))
                skn = (jbn * BS + cidx).to(tl.int64)
                kn = tl.load(kbase + skn[:, None] * s_kt + d[None, :], mask=cidx[:, None] < tl.where(more, BS, 0),
                             other=0.0)
                v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :])
                s_n = _dot(q, tl.trans(kn), IEEE)
                m, l, acc = _attend_step(s * sm_scale2, v, m, l, acc, IEEE)
                s = s_n
                sk64 = skn
        else:
            for it in range(n_pair, n_full):
                jb = tl.load(lst + it)
                sk64 = (jb * BS + cidx).to(tl.int64)
                k = tl.load(kbase + sk64[:, None] * s_kt + d[None, :])
                v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :])
                s = _dot(q, tl.trans(k), IEEE)
                m, l, acc = _attend_step(s * sm_scale2, v, m, l, acc, IEEE)
        for it in range(n_full, cnt):
            jb = tl.load(lst + it)
            sk = jb * BS + cidx
            kv = sk <= pmax
            sk64 = sk.to(tl.int64)
            k = tl.load(kbase + sk64[:, None] * s_kt + d[None, :], mask=kv[:, None], other=0.0)
            v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :], mask=kv[:, None], other=0.0)
            s = _dot(q, tl.trans(k), IEEE)
            ok = sk[None, :] <= pos[:, None]
            if USE_BITS:
                byte = tl.load(BITS + b * s_bb + g * s_bh + t64 * s_bt + jb // 8, mask=rm, other=0).to(tl.int32)
                ok = ok & (((byte >> (jb % 8)) & 1) != 0)[:, None]
            s = tl.where(ok, s, float("-inf"))
            m, l, acc = _attend_step(s * sm_scale2, v, m, l, acc, IEEE)
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), 1.0e30)
        tl.store(O + b * s_ob + h[:, None] * s_oh + t64[:, None] * s_ot + d[None, :], o.to(O.dtype.element_ty),
                 mask=rm[:, None])
        tl.store(LSE + b * s_lb + h * s_lh + t64, lse, mask=rm)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, QPOS, ROWS, LISTS, COUNTS, BITS,
        Hkv, sm_scale2, sm_scale,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_lb, s_lh,
        s_Lb, s_Lh, s_Lr, s_nb, s_nh, s_bb, s_bh, s_bt,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, TPR: tl.constexpr, BS: tl.constexpr,
        D: tl.constexpr, USE_BITS: tl.constexpr, IEEE: tl.constexpr,
    ):
        # Q, DO and DQ share strides (the wrapper makes them contiguous).
        pid = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        row = pid // TPR
        t64, rm, pos, hh, live = _row_tile(QPOS, ROWS, row, pid % TPR, G, GP, BLOCK_T)
        k0 = tl.load(ROWS + row * 8 + 2).to(tl.int64)
        pmax = tl.max(pos, 0)
        h = (g * G + hh).to(tl.int64)
        d = tl.arange(0, D)
        qoff = b * s_qb + h[:, None] * s_qh + t64[:, None] * s_qt + d[None, :]
        q = tl.load(Q + qoff, mask=rm[:, None], other=0.0)
        do = tl.load(DO + qoff, mask=rm[:, None], other=0.0)
        lse = tl.load(LSE + b * s_lb + h * s_lh + t64, mask=rm, other=1.0e30)
        delta = tl.load(DELTA + b * s_lb + h * s_lh + t64, mask=rm, other=0.0)
        cnt = tl.load(COUNTS + b * s_nb + g * s_nh + row)
        cnt = tl.where(live, cnt, 0)
        lst = LISTS + b * s_Lb + g * s_Lh + row.to(tl.int64) * s_Lr
        kbase = K + b * s_kb + g * s_kh + k0 * s_kt
        vbase = V + b * s_vb + g * s_vh + k0 * s_vt
        BM: tl.constexpr = GP * BLOCK_T
        dq = tl.zeros([BM, D], dtype=tl.float32)
        n_full = _full_prefix(lst, cnt, tl.min(tl.where(rm, pos, 1 << 30), 0), pmax, BS, USE_BITS)
        lse = tl.where(rm, lse, 1.0e30)  # padded rows: p = 0 without a mask
        for it in range(0, n_full):
            jb = tl.load(lst + it)
            sk64 = (jb * BS + tl.arange(0, BS)).to(tl.int64)
            k = tl.load(kbase + sk64[:, None] * s_kt + d[None, :])
            v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :])
            p = tl.exp2(_dot(q, tl.trans(k), IEEE) * sm_scale2 - lse[:, None])
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        for it in range(n_full, cnt):
            jb = tl.load(lst + it)
            sk = jb * BS + tl.arange(0, BS)
            kv = sk <= pmax
            sk64 = sk.to(tl.int64)
            k = tl.load(kbase + sk64[:, None] * s_kt + d[None, :], mask=kv[:, None], other=0.0)
            v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :], mask=kv[:, None], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * sm_scale2
            ok = (sk[None, :] <= pos[:, None]) & rm[:, None]
            if USE_BITS:
                byte = tl.load(BITS + b * s_bb + g * s_bh + t64 * s_bt + jb // 8, mask=rm, other=0).to(tl.int32)
                ok = ok & (((byte >> (jb % 8)) & 1) != 0)[:, None]
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        tl.store(DQ + qoff, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rm[:, None])

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, QPOS, ROWS, KBT, REV_OFF, REV_ROW, BITS,
        Hkv, NBT, sm_scale2, sm_scale,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_lb, s_lh, s_bb, s_bh, s_bt,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, TPR: tl.constexpr, BS: tl.constexpr,
        D: tl.constexpr, USE_BITS: tl.constexpr, IEEE: tl.constexpr,
    ):
        # One program per (global key block, KV group): walks the rows that read the block (the transposed lists).
        # K, DK share strides; V, DV share strides (the wrapper makes them contiguous).
        kb = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        k0 = tl.load(KBT + kb * 4).to(tl.int64)
        jb = tl.load(KBT + kb * 4 + 1)
        L = tl.load(KBT + kb * 4 + 2)
        d = tl.arange(0, D)
        sk = jb * BS + tl.arange(0, BS)
        km = sk < L
        sk64 = (k0 + sk).to(tl.int64)
        koff = b * s_kb + g * s_kh + sk64[:, None] * s_kt + d[None, :]
        voff = b * s_vb + g * s_vh + sk64[:, None] * s_vt + d[None, :]
        k = tl.load(K + koff, mask=km[:, None], other=0.0)
        v = tl.load(V + voff, mask=km[:, None], other=0.0)
        dk = tl.zeros([BS, D], dtype=tl.float32)
        dv = tl.zeros([BS, D], dtype=tl.float32)
        key = bg.to(tl.int64) * NBT + kb
        start = tl.load(REV_OFF + key).to(tl.int32)
        end = tl.load(REV_OFF + key + 1).to(tl.int32)
        for e in range(start, end):
            row = tl.load(REV_ROW + e)
            for sub in range(TPR):
                t64, rm, pos, hh, live = _row_tile(QPOS, ROWS, row, sub, G, GP, BLOCK_T)
                h = (g * G + hh).to(tl.int64)
                qoff = b * s_qb + h[:, None] * s_qh + t64[:, None] * s_qt + d[None, :]
                q = tl.load(Q + qoff, mask=rm[:, None], other=0.0)
                do = tl.load(DO + qoff, mask=rm[:, None], other=0.0)
                lse = tl.load(LSE + b * s_lb + h * s_lh + t64, mask=rm, other=1.0e30)
                delta = tl.load(DELTA + b * s_lb + h * s_lh + t64, mask=rm, other=0.0)
                s = _dot(q, tl.trans(k), IEEE) * sm_scale2
                ok = (sk[None, :] <= pos[:, None]) & km[None, :] & rm[:, None]
                if USE_BITS:
                    byte = tl.load(BITS + b * s_bb + g * s_bh + t64 * s_bt + jb // 8, mask=rm, other=0).to(tl.int32)
                    ok = ok & (((byte >> (jb % 8)) & 1) != 0)[:, None]
                p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
                dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
                dp = _dot(do, tl.trans(v), IEEE)
                ds = p * (dp - delta[:, None])
                dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        tl.store(DK + koff, (dk * sm_scale).to(DK.dtype.element_ty), mask=km[:, None])
        tl.store(DV + voff, dv.to(DV.dtype.element_ty), mask=km[:, None])


def _fwd(q, k, v, sel: Selection, scale: float, tuning: dict):
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    # Default tiles: 256 query rows (a whole 64-token group of 4 heads), 16 warps, 2 stages - the fastest of the
    # configurations swept on an H100 at 128K (bench/results/kernels-sparse.md).
    GP, block_t = _tiles(G, D, rows=tuning.get("fwd_rows", 256))
    block_t = min(block_t, _pow2(sel.row_tokens))
    tpr = -(-sel.row_tokens // block_t)
    rows = GP * block_t
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    bits = sel.bits if sel.bits is not None else sel.counts
    bs = sel.bits.stride() if sel.bits is not None else (0, 0, 0)
    grid = (sel.rows.shape[0] * tpr, B * Hkv)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, sel.q_pos, sel.rows, sel.lists, sel.counts, bits, Hkv, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        sel.lists.stride(0), sel.lists.stride(1), sel.lists.stride(2), sel.counts.stride(0), sel.counts.stride(1),
        bs[0], bs[1], bs[2],
        G=G, GP=GP, BLOCK_T=block_t, TPR=tpr, BS=sel.block_size, D=D, USE_BITS=sel.bits is not None,
        IEEE=q.dtype == torch.float32, PAIR=bool(tuning.get("fwd_pair", False)),
        PIPE=bool(tuning.get("fwd_pipe", False)),
        num_warps=tuning.get("fwd_warps", 16 if rows >= 256 else 8 if rows >= 128 else 4),
        num_stages=tuning.get("fwd_stages", 3 if D <= 128 and rows < 256 else 2), **_launch_extra(tuning, "fwd"),
    )
    return o, lse


def _bwd(q, k, v, o, lse, do, sel: Selection, scale: float, tuning: dict):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    GP, block_t = _tiles(G, D, rows=tuning.get("bwd_rows", 64))
    block_t = min(block_t, _pow2(sel.row_tokens))
    tpr = -(-sel.row_tokens // block_t)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    delta = (o.float() * do.float()).sum(-1)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    bits = sel.bits if sel.bits is not None else sel.counts
    bs = sel.bits.stride() if sel.bits is not None else (0, 0, 0)
    common = dict(G=G, GP=GP, BLOCK_T=block_t, TPR=tpr, BS=sel.block_size, D=D, USE_BITS=sel.bits is not None,
                  IEEE=q.dtype == torch.float32, num_warps=tuning.get("bwd_warps", 4),
                  num_stages=tuning.get("bwd_stages", 2), **_launch_extra(tuning, "bwd"))
    _attn_bwd_dq_kernel[(sel.rows.shape[0] * tpr, B * Hkv)](
        q, k, v, do, dq, lse, delta, sel.q_pos, sel.rows, sel.lists, sel.counts, bits, Hkv, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), lse.stride(0), lse.stride(1), sel.lists.stride(0), sel.lists.stride(1), sel.lists.stride(2),
        sel.counts.stride(0), sel.counts.stride(1), bs[0], bs[1], bs[2], **common,
    )
    kbt = sel.key_table(Tk)
    nbt = kbt.shape[0]
    off, rows = sel.reverse(nbt)
    _attn_bwd_dkdv_kernel[(nbt, B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, sel.q_pos, sel.rows, kbt, off, rows, bits, Hkv, nbt, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), lse.stride(0), lse.stride(1), bs[0], bs[1], bs[2], **common,
    )
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sel, scale, tuning):
        o, lse = _fwd(q, k, v, sel, scale, tuning)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.sel = sel
        ctx.scale = scale
        ctx.tuning = tuning
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(q, k, v, o, lse, do, ctx.sel, ctx.scale, ctx.tuning)
        return dq, dk, dv, None, None, None


def block_sparse_attention_triton(q, k, v, q_pos, sel: Selection, *, scale: float,
                                  block_size: int | None = None, tuning: dict | None = None) -> torch.Tensor:
    """Softmax attention of each query over the tokens of its selected blocks, causal; differentiable in q, k, v.
    The query positions are the selection's (`q_pos` is accepted for the reference's signature)."""
    if block_size is not None and block_size != sel.block_size:
        raise ValueError(f"block_size {block_size} differs from the selection's {sel.block_size}")
    if q_pos is not None and q_pos.numel() != sel.q_pos.numel():
        raise ValueError(f"q_pos has {q_pos.numel()} positions, the selection {sel.q_pos.numel()}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    return _BlockSparseAttention.apply(q, k, v, sel, scale, tuning or {})
