"""InfLLM-V2 sparse Triton kernels, decode: one query token per sequence, selection and attention in four launches
(`decode_attention_triton`, `decode_select_triton`). See sparse_triton.py.
"""

from __future__ import annotations

import torch

from .sparse_common import _LOG2E, HAS_TRITON, _pow2, tl, triton
from .sparse_compress import coarse_from_compressed
from .sparse_reference import SparseOptions
from .sparse_select import Selection, _rows_single

if HAS_TRITON:
    from .sparse_common import _attend_step, _dot, _dot_f32, _lse_step

    @triton.jit
    def _decode_logits_kernel(
        Q, CK, CK2, QPOS, LG, MX, SM,
        NC, NC2, Hkv, sm_scale2, NCP, NCH,
        s_qb, s_qh, s_cb, s_ch, s_cc, s_c2b, s_c2h, s_c2c,
        G: tl.constexpr, RM: tl.constexpr, CH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr,
        D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, KERNEL2: tl.constexpr, STRIDE2: tl.constexpr,
        STEP2: tl.constexpr, COARSE: tl.constexpr, IEEE: tl.constexpr,
    ):
        # One program: one chunk of CH compressed keys of one (sequence, KV group). Writes the scaled logits (base 2)
        # of the group's heads and the chunk's softmax statistics (max, sum) per head over the visible keys
        # (K1, or with COARSE the K2 keys of the matching chunk of K2).
        pid_c = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        r = tl.arange(0, RM)
        rm = r < G
        d = tl.arange(0, D)
        pos = tl.load(QPOS).to(tl.int32)
        # Scores in float32 as the reference computes them (decode is memory-bound: the precision is free).
        q = tl.load(Q + b * s_qb + (g * G + r)[:, None].to(tl.int64) * s_qh + d[None, :], mask=rm[:, None],
                    other=0.0).to(tl.float32)
        m = tl.full([RM], -1.0e30, dtype=tl.float32)
        l = tl.zeros([RM], dtype=tl.float32)
        lg_rows = LG + (bg.to(tl.int64) * G + r[:, None]) * NCP
        for c0 in range(0, CH, BLOCK_C):
            c = pid_c * CH + c0 + tl.arange(0, BLOCK_C)
            cm = c < NC
            kc = tl.load(CK + b * s_cb + g * s_ch + c[:, None].to(tl.int64) * s_cc + d[None, :], mask=cm[:, None],
                         other=0.0).to(tl.float32)
            s = _dot_f32(q, tl.trans(kc), IEEE) * sm_scale2
            tl.store(lg_rows + c[None, :], s, mask=rm[:, None] & cm[None, :])
            if not COARSE:
                vis = ((c * STRIDE + KERNEL - 1) <= pos) & cm
                s = tl.where(vis[None, :], s, float("-inf"))
                m, l = _lse_step(s, m, l)
        if COARSE:
            for c0 in range(0, CH // STEP2, BLOCK_C2):
                c = pid_c * (CH // STEP2) + c0 + tl.arange(0, BLOCK_C2)
                cm = c < NC2
                kc = tl.load(CK2 + b * s_c2b + g * s_c2h + c[:, None].to(tl.int64) * s_c2c + d[None, :],
                             mask=cm[:, None], other=0.0).to(tl.float32)
                s = _dot_f32(q, tl.trans(kc), IEEE) * sm_scale2
                vis = ((c * STRIDE2 + KERNEL2 - 1) <= pos) & cm
                s = tl.where(vis[None, :], s, float("-inf"))
                m, l = _lse_step(s, m, l)
        st = (bg * NCH + pid_c) * RM + r
        tl.store(MX + st, m)
        tl.store(SM + st, l)

    @triton.jit
    def _decode_select_kernel(
        LG, MX, SM, QPOS, LISTS, COUNTS,
        NC, NB, NCP, NCH, k_eff, topk, init_blocks, local_blocks, dense_len, s_L,
        G: tl.constexpr, RM: tl.constexpr, NBP: tl.constexpr, LOG_NBP: tl.constexpr, CT: tl.constexpr,
        WIDTH: tl.constexpr, BS: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    ):
        # One program per (sequence, KV group): normaliser per head, group-summed probabilities, max over the keys
        # overlapping each block, forced blocks, exact top-k (ties: the later block) by bisection, ascending list.
        bg = tl.program_id(0)
        pos = tl.load(QPOS).to(tl.int32)
        hv = tl.arange(0, RM)
        mt = tl.full([RM], -1.0e30, dtype=tl.float32)
        for c0 in range(0, NCH, CT):
            cc = c0 + tl.arange(0, CT)
            mm = tl.load(MX + (bg * NCH + cc[:, None]) * RM + hv[None, :], mask=(cc < NCH)[:, None], other=-1.0e30)
            mt = tl.maximum(mt, tl.max(mm, 0))
        lt = tl.zeros([RM], dtype=tl.float32)
        for c0 in range(0, NCH, CT):
            cc = c0 + tl.arange(0, CT)
            off = (bg * NCH + cc[:, None]) * RM + hv[None, :]
            mm = tl.load(MX + off, mask=(cc < NCH)[:, None], other=-1.0e30)
            ll = tl.load(SM + off, mask=(cc < NCH)[:, None], other=0.0)
            lt += tl.sum(ll * tl.exp2(mm - mt[None, :]), 0)
        lse = tl.where(lt > 0, mt + tl.log2(tl.where(lt > 0, lt, 1.0)), 0.0)  # nothing visible: unnormalised
        j = tl.arange(0, NBP)
        jv = j < NB
        lo = tl.where(j * BS >= KERNEL, (j * BS - KERNEL) // STRIDE + 1, 0)
        hi = ((j + 1) * BS - 1) // STRIDE
        acc = tl.full([NBP], float("-inf"), dtype=tl.float32)
        for w in range(WIDTH):
            i = lo + w
            ok = jv & (i <= hi) & (i < NC) & ((i * STRIDE + KERNEL - 1) <= pos)
            sc = tl.zeros([NBP], dtype=tl.float32)
            for h in range(G):
                lse_h = tl.sum(tl.where(hv == h, lse, 0.0), 0)
                x = tl.load(LG + (bg.to(tl.int64) * G + h) * NCP + i, mask=ok, other=float("-inf"))
                sc += tl.exp2(x - lse_h)
            acc = tl.maximum(acc, tl.where(ok, sc, float("-inf")))
        own = pos // BS
        vis_b = jv & (j <= own)
        forced = vis_b & ((j < init_blocks) | (j > own - local_blocks))
        dense = ((pos + 1) < dense_len) | ((own + 1) <= topk)
        ranked = tl.where(forced, float("inf"), tl.where(vis_b, acc, float("-inf")))
        bits = ranked.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # order-preserving integer image
        key = tl.where(jv, key, -(1 << 40))
        # The k_eff-th largest key: largest thr with #(key >= thr) >= k_eff.
        lo_k = tl.full([], -(1 << 34), dtype=tl.int64)
        hi_k = tl.full([], (1 << 31) + 1, dtype=tl.int64)
        for _ in range(36):
            mid = lo_k + (hi_k - lo_k) // 2
            ge = tl.sum((key >= mid).to(tl.int32), 0) >= k_eff
            lo_k = tl.where(ge, mid, lo_k)
            hi_k = tl.where(ge, hi_k, mid)
        above = key > lo_k
        tie = key == lo_k
        need = k_eff - tl.sum(above.to(tl.int32), 0)
        # Among the tied blocks, the `need` latest: largest m with #(tie & j >= m) >= need.
        lo_m = tl.full([], 0, dtype=tl.int32)
        hi_m = tl.full([], NBP, dtype=tl.int32)
        for _ in range(LOG_NBP + 1):
            mid = lo_m + (hi_m - lo_m) // 2
            ge = tl.sum((tie & (j >= mid)).to(tl.int32), 0) >= need
            lo_m = tl.where(ge, mid, lo_m)
            hi_m = tl.where(ge, hi_m, mid)
        chosen = above | (tie & (j >= lo_m))
        final = (chosen | forced | dense) & vis_b
        fi = final.to(tl.int32)
        slot = tl.cumsum(fi, 0) - 1
        tl.store(LISTS + bg.to(tl.int64) * s_L + slot, j, mask=fi != 0)
        tl.store(COUNTS + bg, tl.sum(fi, 0))

    @triton.jit
    def _decode_attn_kernel(
        Q, K, V, QPOS, LISTS, COUNTS, OP, MP, LP,
        Tk, Hkv, sm_scale2, NSPLIT,
        s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_L,
        G: tl.constexpr, RM: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    ):
        # One program: one share of the selected blocks of one (sequence, KV group); all its heads as rows.
        sp = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        r = tl.arange(0, RM)
        rm = r < G
        d = tl.arange(0, D)
        pos = tl.load(QPOS).to(tl.int32)
        q = tl.load(Q + b * s_qb + (g * G + r)[:, None].to(tl.int64) * s_qh + d[None, :], mask=rm[:, None], other=0.0)
        n = tl.load(COUNTS + bg)
        per = (n + NSPLIT - 1) // NSPLIT
        start = sp * per
        end = tl.minimum(n, start + per)
        kbase = K + b * s_kb + g * s_kh
        vbase = V + b * s_vb + g * s_vh
        lst = LISTS + bg.to(tl.int64) * s_L
        m = tl.full([RM], -1.0e30, dtype=tl.float32)
        l = tl.zeros([RM], dtype=tl.float32)
        acc = tl.zeros([RM, D], dtype=tl.float32)
        for i in range(start, end):
            jb = tl.load(lst + i)
            sk = jb * BS + tl.arange(0, BS)
            km = sk < Tk
            sk64 = sk.to(tl.int64)
            k = tl.load(kbase + sk64[:, None] * s_kt + d[None, :], mask=km[:, None], other=0.0)
            v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :], mask=km[:, None], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * sm_scale2
            s = tl.where(((sk <= pos) & km)[None, :], s, float("-inf"))
            m, l, acc = _attend_step(s, v, m, l, acc, IEEE)
        row = (bg * NSPLIT + sp) * RM + r
        tl.store(OP + row[:, None].to(tl.int64) * D + d[None, :], acc)
        tl.store(MP + row, m)
        tl.store(LP + row, l)

    @triton.jit
    def _decode_combine_kernel(
        OP, MP, LP, O, Hkv, NSPLIT, s_ob, s_oh,
        G: tl.constexpr, RM: tl.constexpr, D: tl.constexpr,
    ):
        bg = tl.program_id(0)
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        r = tl.arange(0, RM)
        d = tl.arange(0, D)
        mt = tl.full([RM], -1.0e30, dtype=tl.float32)
        for sp in range(NSPLIT):
            mt = tl.maximum(mt, tl.load(MP + (bg * NSPLIT + sp) * RM + r))
        lt = tl.zeros([RM], dtype=tl.float32)
        acc = tl.zeros([RM, D], dtype=tl.float32)
        for sp in range(NSPLIT):
            row = (bg * NSPLIT + sp) * RM + r
            w = tl.exp2(tl.load(MP + row) - mt)
            lt += tl.load(LP + row) * w
            acc += tl.load(OP + row[:, None].to(tl.int64) * D + d[None, :]) * w[:, None]
        o = acc / tl.where(lt > 0, lt, 1.0)[:, None]
        tl.store(O + b * s_ob + (g * G + r)[:, None].to(tl.int64) * s_oh + d[None, :], o.to(O.dtype.element_ty),
                 mask=(r < G)[:, None])



def _decode_plan(B: int, Hkv: int, nc: int, step2: int) -> tuple[int, int]:
    """(keys per logits program, attention splits): enough programs to fill the GPU (~1K), not more."""
    bh = B * Hkv
    ch = min(1024, max(64, 16 * step2, _pow2(-(-max(nc, 1) * bh // 1024))))
    nsplit = max(1, min(32, _pow2(-(-512 // bh))))
    return ch, nsplit


def _decode_select(q, ck, q_pos, nb, *, scale, options: SparseOptions, coarse_keys):
    """Launches 1-2 of the decode path: (lists (B*Hkv, NB) int32, counts (B*Hkv,) int32)."""
    o = options
    block_size, kernel, stride, topk = o.block_size, o.kernel, o.stride, o.topk
    init_blocks, local_blocks, dense_len = o.init_blocks, o.local_blocks, o.dense_len
    coarse, coarse_kernel, coarse_stride = o.coarse, o.coarse_kernel, o.coarse_stride
    B, Hq, _, D = q.shape
    Hkv, nc = ck.shape[1], ck.shape[2]
    G = Hq // Hkv
    RM = max(16, _pow2(G))
    if coarse:
        if coarse_keys is None:
            coarse_keys = coarse_from_compressed(ck, kernel, stride, coarse_kernel, coarse_stride)
        ck2, k2, s2 = coarse_keys, coarse_kernel, coarse_stride
        step2 = coarse_stride // stride
    else:
        ck2, k2, s2, step2 = ck, kernel, stride, 1
    ch, _ = _decode_plan(B, Hkv, nc, step2)
    nch = -(-max(nc, 1) // ch)
    ncp = nch * ch
    dev = q.device
    lg = torch.empty(B * Hkv, G, ncp, dtype=torch.float32, device=dev)
    mx = torch.empty(B * Hkv, nch, RM, dtype=torch.float32, device=dev)
    sm = torch.empty_like(mx)
    _decode_logits_kernel[(nch, B * Hkv)](
        q, ck, ck2, q_pos, lg, mx, sm, nc, ck2.shape[2], Hkv, scale * _LOG2E, ncp, nch,
        q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), ck.stride(2), ck2.stride(0), ck2.stride(1),
        ck2.stride(2), G=G, RM=RM, CH=ch, BLOCK_C=64, BLOCK_C2=min(64, ch // step2), D=D, KERNEL=kernel,
        STRIDE=stride, KERNEL2=k2, STRIDE2=s2, STEP2=step2, COARSE=coarse, IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    lists = torch.empty(B * Hkv, nb, dtype=torch.int32, device=dev)
    counts = torch.empty(B * Hkv, dtype=torch.int32, device=dev)
    nbp = _pow2(nb)
    _decode_select_kernel[(B * Hkv,)](
        lg, mx, sm, q_pos, lists, counts, nc, nb, ncp, nch, min(topk, nb), topk, init_blocks, local_blocks,
        dense_len, lists.stride(0), G=G, RM=RM, NBP=nbp, LOG_NBP=nbp.bit_length() - 1, CT=64,
        WIDTH=(block_size + kernel - 2) // stride + 1, BS=block_size, KERNEL=kernel, STRIDE=stride,
        num_warps=8 if nbp >= 2048 else 4,
    )
    return lists, counts


def decode_select_triton(q, ckeys, q_pos, num_kv_blocks, *, scale, options: SparseOptions | None = None,
                         coarse_keys=None, **fields) -> Selection:
    """The decode path's selection for one query token (q (B, Hq, 1, D)), as a `Selection` (for tests and tools).
    `options` / `fields`: SparseOptions (`selection` and `select_tokens` do not matter for one token)."""
    o = SparseOptions.of(options, **fields)
    B, Hkv = q.shape[0], ckeys.shape[1]
    lists, counts = _decode_select(q, ckeys, q_pos, num_kv_blocks, scale=scale, options=o, coarse_keys=coarse_keys)
    return Selection(lists.view(B, Hkv, 1, -1), counts.view(B, Hkv, 1), None, _rows_single(1, 1, 0, q.device),
                     q_pos.to(device=q.device, dtype=torch.int32).view(1), 1, num_kv_blocks, o.block_size)


def decode_attention_triton(q, k, v, q_pos, ckeys, *, scale, options: SparseOptions | None = None, coarse_keys=None,
                            **fields) -> torch.Tensor:
    """One new token per sequence (q (B, Hq, 1, D), position q_pos (1,)) against the cache k, v (B, Hkv, Tk, D) and
    its compressed keys: selection and attention in four launches, no host synchronisation (CUDA-graph safe).
    Same function as the per-token path; forward only. `options` / `fields`: SparseOptions."""
    opts = SparseOptions.of(options, **fields)
    block_size = opts.block_size
    B, Hq, _, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    RM = max(16, _pow2(G))
    nb = -(-Tk // block_size)
    lists, counts = _decode_select(q, ckeys, q_pos, nb, scale=scale, options=opts, coarse_keys=coarse_keys)
    _, nsplit = _decode_plan(B, Hkv, ckeys.shape[2], 1)
    dev = q.device
    op = torch.empty(B * Hkv * nsplit * RM, D, dtype=torch.float32, device=dev)
    mp = torch.empty(B * Hkv * nsplit * RM, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    _decode_attn_kernel[(nsplit, B * Hkv)](
        q, k, v, q_pos, lists, counts, op, mp, lp, Tk, Hkv, scale * _LOG2E, nsplit,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        lists.stride(0), G=G, RM=RM, BS=block_size, D=D, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=3,
    )
    o = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=dev)
    _decode_combine_kernel[(B * Hkv,)](op, mp, lp, o, Hkv, nsplit, o.stride(0), o.stride(1), G=G, RM=RM, D=D,
                                       num_warps=4)
    return o
