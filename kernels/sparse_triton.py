"""InfLLM-V2 block-sparse attention in Triton: block selection, sparse attention forward/backward and decode.

Computes the function of `sparse_reference.py` (same arguments; that file is the spec):

1. `compress_keys_triton`: K1_i = mean(K[stride*i : stride*i + kernel]) in float32.
2. Selection scores, one fused kernel (`_select_scores_kernel`). A program owns one tile of query tokens of one KV group
   and holds the queries of ALL the group's heads as the rows of one matrix (row = head * BLOCK_T + token). Pass 1
   walks the compressed keys and keeps the softmax normaliser (log-sum-exp) of every row in registers; pass 2 walks
   them again and writes only the group sum of the probabilities, softmax(q K1^T * scale) summed over the heads of the
   group (per token, or also summed over the tokens of a query block, see below). Per-head score matrices never exist
   in memory. With `coarse=True` pass 1 uses the coarse keys K2 (kernel 128, stride 64; derived exactly from K1 as
   the mean of 4 non-overlapping K1 windows), a quarter of the work: an approximate normaliser (InfLLM-V2's trick).
3. Block scores (max over the compressed keys overlapping each block = max-pool of width R+E, stride R, left padding
   E with R = block/stride, E = ceil(kernel/stride)-1), forced init/local blocks, top-k, with the reference's tie rule
   (equal scores: the later block wins) - plain PyTorch on the small (rows, Nc) score matrix.
4. `_attn_fwd_kernel` / `_attn_bwd_dq_kernel` / `_attn_bwd_dkdv_kernel`: flash-attention style kernels over a list of
   key blocks per (query tile, KV group). All query heads of a group are rows of one tile, so each K/V block is read
   once per group and tile. Causal mask inside the own block, fp32 softmax and accumulation, exp2 arithmetic.
   dk/dv use the transposed lists (for each key block, the query tiles that read it), so no atomics.

Selection modes (option `selection`, both defined in sparse_reference.py):
- "token" (default): each query token has its own selection. The kernels walk the union of the selections of the
  tokens of a tile and mask, per row, the blocks that row's token did not select (a bitset per token). Costs more when
  neighbouring tokens disagree (random data) than when they agree.
- "block": queries grouped by absolute position, group = q_pos // `select_tokens` (default 64 = one key block's worth
  of queries); the call's tokens of a group share one selection (sum over them of the per-token group scores, forced
  blocks of every token, dense if any token is). Tiles are aligned to absolute positions (`Selection.offset` =
  q_pos[0] % select_tokens, one host read of q_pos[0]); q_pos must be consecutive (every caller's is). A split of the
  queries at a multiple of select_tokens changes nothing.
Option `coarse`: the score softmax's normaliser from K2 (`coarse_from_compressed`), as the reference's `coarse=True`.

Decode (`decode_attention_triton`, taken by `infllm_v2_attention_triton` for one query token without gradients): four
launches, no host synchronisation (CUDA-graph safe): (1) split-key logits of every head against K1 in float32 (3 tf32
tensor-core products) plus per-chunk softmax statistics (over K2 with `coarse`; without cached `coarse_keys`, K2 is
first derived from K1 by a few PyTorch ops); (2) one program per (sequence, KV
group): normaliser, group-summed probabilities, block max-pool, forced blocks and an exact top-k by bisection on the
order-preserving integer image of the scores (ties: the later block), written as an ascending block list; (3) split
attention over the listed blocks; (4) combine. Batch B >= 1 shares q_pos, like the reference. Not implemented: packed
varlen sequences (cu_seqlens) - the model calls this once per document. Speed: bench/RESULTS.md, "Sparse kernels".
This file imports only torch and triton (triton inside try).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "Selection",
    "compress_keys_triton",
    "coarse_from_compressed",
    "select_blocks_triton",
    "block_sparse_attention_triton",
    "decode_attention_triton",
    "decode_select_triton",
    "infllm_v2_attention_triton",
    "supports",
]

_LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            r = tl.dot(a, b, input_precision="ieee")
        else:
            r = tl.dot(a, b)
        return r

    @triton.jit
    def _dot_f32(a, b, IEEE: tl.constexpr):
        # float32 operands at float32 accuracy: exact FMA in the interpreter, 3 tf32 tensor-core products on the GPU.
        if IEEE:
            r = tl.dot(a, b, input_precision="ieee")
        else:
            r = tl.dot(a, b, input_precision="tf32x3")
        return r

    @triton.jit
    def _compress_kernel(
        K, O, NC, H, s_kb, s_kh, s_kt, s_ob, s_oh, s_oc,
        KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        d = tl.arange(0, D)
        cm = c < NC
        base = K + b * s_kb + h * s_kh
        acc = tl.zeros([BLOCK_C, D], dtype=tl.float32)
        for w in range(KERNEL):
            pos = (c * STRIDE + w).to(tl.int64)
            acc += tl.load(base + pos[:, None] * s_kt + d[None, :], mask=cm[:, None], other=0.0).to(tl.float32)
        acc = acc / KERNEL
        tl.store(O + b * s_ob + h * s_oh + c[:, None].to(tl.int64) * s_oc + d[None, :], acc, mask=cm[:, None])

    @triton.jit
    def _select_scores_kernel(
        Q, CK, CK2, QPOS, OUT,
        Tq, NC, NC2, Hkv, sm_scale2, OFF,
        s_qb, s_qh, s_qt,
        s_cb, s_ch, s_cc,
        s_c2b, s_c2h, s_c2c,
        s_ob, s_oh, s_or,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, SEL_T: tl.constexpr, BLOCK_C: tl.constexpr,
        D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, KERNEL2: tl.constexpr, STRIDE2: tl.constexpr,
        PER_TOKEN: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_bg = tl.program_id(1)
        b = (pid_bg // Hkv).to(tl.int64)
        g = (pid_bg % Hkv).to(tl.int64)
        BM: tl.constexpr = GP * BLOCK_T
        r = tl.arange(0, BM)
        hh = r // BLOCK_T
        tok = r % BLOCK_T
        t = pid_t * BLOCK_T + tok - OFF  # OFF: tiles aligned to absolute positions (block mode)
        rm = (hh < G) & (t >= 0) & (t < Tq)
        pos = tl.load(QPOS + t, mask=rm, other=-1)
        pmax = tl.max(pos, 0)
        d = tl.arange(0, D)
        h = g * G + hh
        q = tl.load(Q + b * s_qb + h[:, None].to(tl.int64) * s_qh + t[:, None].to(tl.int64) * s_qt + d[None, :],
                    mask=rm[:, None], other=0.0)
        # Pass 1: log-sum-exp (base 2) of every row over the visible keys (K1, or the coarse K2).
        m = tl.full([BM], -1.0e30, dtype=tl.float32)
        l = tl.zeros([BM], dtype=tl.float32)
        nv2 = tl.where(pmax >= KERNEL2 - 1, (pmax - KERNEL2 + 1) // STRIDE2 + 1, 0)
        nv2 = tl.minimum(nv2, NC2)
        for c0 in range(0, nv2, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            kc = tl.load(CK2 + b * s_c2b + g * s_c2h + c[:, None].to(tl.int64) * s_c2c + d[None, :],
                         mask=(c < NC2)[:, None], other=0.0).to(q.dtype)
            s = _dot(q, tl.trans(kc), IEEE) * sm_scale2
            vis = ((c[None, :] * STRIDE2 + KERNEL2 - 1) <= pos[:, None]) & (c < NC2)[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), 0.0)  # rows that see no (coarse) key: unnormalised
        # Pass 2: group-summed probabilities over K1.
        nv = tl.where(pmax >= KERNEL - 1, (pmax - KERNEL + 1) // STRIDE + 1, 0)
        nv = tl.minimum(nv, NC)
        for c0 in range(0, NC, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < NC
            if c0 < nv:
                kc = tl.load(CK + b * s_cb + g * s_ch + c[:, None].to(tl.int64) * s_cc + d[None, :],
                             mask=cm[:, None], other=0.0).to(q.dtype)
                s = _dot(q, tl.trans(kc), IEEE) * sm_scale2
                vis = ((c[None, :] * STRIDE + KERNEL - 1) <= pos[:, None]) & cm[None, :] & rm[:, None]
                p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
                if PER_TOKEN:
                    ps = tl.sum(tl.reshape(p, (GP, BLOCK_T, BLOCK_C)), 0)
                    tv = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
                    pv = tl.load(QPOS + tv, mask=tv < Tq, other=-1)
                    visv = (c[None, :] * STRIDE + KERNEL - 1) <= pv[:, None]
                    tl.store(OUT + b * s_ob + g * s_oh + tv[:, None].to(tl.int64) * s_or + c[None, :],
                             tl.where(visv, ps, float("-inf")), mask=(tv < Tq)[:, None] & cm[None, :])
                else:
                    row = (pid_t * BLOCK_T) // SEL_T
                    tl.atomic_add(OUT + b * s_ob + g * s_oh + row * s_or + c, tl.sum(p, 0), mask=cm)
            else:
                if PER_TOKEN:
                    tv = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
                    tl.store(OUT + b * s_ob + g * s_oh + tv[:, None].to(tl.int64) * s_or + c[None, :],
                             tl.full([BLOCK_T, BLOCK_C], float("-inf"), tl.float32),
                             mask=(tv < Tq)[:, None] & cm[None, :])

    @triton.jit
    def _row_setup(QPOS, Tq, OFF, pid_t, g, G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr):
        BM: tl.constexpr = GP * BLOCK_T
        r = tl.arange(0, BM)
        hh = r // BLOCK_T
        t = pid_t * BLOCK_T + r % BLOCK_T - OFF
        rm = (hh < G) & (t >= 0) & (t < Tq)
        pos = tl.load(QPOS + t, mask=rm, other=-1)
        h = (g * G + hh).to(tl.int64)
        return t, rm, pos, h

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, QPOS, LISTS, COUNTS, BITS,
        Tq, Tk, Hkv, sm_scale2, OFF,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
        s_Lb, s_Lh, s_Ls, s_nb, s_nh, s_bb, s_bh, s_bt,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, SEL_T: tl.constexpr, BS: tl.constexpr,
        D: tl.constexpr, USE_BITS: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_bg = tl.program_id(1)
        b = (pid_bg // Hkv).to(tl.int64)
        g = (pid_bg % Hkv).to(tl.int64)
        t, rm, pos, h = _row_setup(QPOS, Tq, OFF, pid_t, g, G, GP, BLOCK_T)
        t64 = t.to(tl.int64)
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + h[:, None] * s_qh + t64[:, None] * s_qt + d[None, :], mask=rm[:, None], other=0.0)
        sel = (pid_t * BLOCK_T) // SEL_T
        n = tl.load(COUNTS + b * s_nb + g * s_nh + sel)
        lst = LISTS + b * s_Lb + g * s_Lh + sel * s_Ls
        kbase = K + b * s_kb + g * s_kh
        vbase = V + b * s_vb + g * s_vh
        BM: tl.constexpr = GP * BLOCK_T
        m = tl.full([BM], -1.0e30, dtype=tl.float32)
        l = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
        for i in range(n):
            jb = tl.load(lst + i)
            sk = jb * BS + tl.arange(0, BS)
            km = sk < Tk
            sk64 = sk.to(tl.int64)
            k = tl.load(kbase + sk64[:, None] * s_kt + d[None, :], mask=km[:, None], other=0.0)
            v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :], mask=km[:, None], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * sm_scale2
            ok = (sk[None, :] <= pos[:, None]) & km[None, :]
            if USE_BITS:
                byte = tl.load(BITS + b * s_bb + g * s_bh + t64 * s_bt + jb // 8, mask=rm, other=0).to(tl.int32)
                ok = ok & (((byte >> (jb % 8)) & 1) != 0)[:, None]
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m = m_new
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), 1.0e30)
        tl.store(O + b * s_ob + h[:, None] * s_oh + t64[:, None] * s_ot + d[None, :], o.to(O.dtype.element_ty),
                 mask=rm[:, None])
        tl.store(LSE + b * s_lb + h * s_lh + t64, lse, mask=rm)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, QPOS, LISTS, COUNTS, BITS,
        Tq, Tk, Hkv, sm_scale2, sm_scale, OFF,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_lb, s_lh,
        s_Lb, s_Lh, s_Ls, s_nb, s_nh, s_bb, s_bh, s_bt,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, SEL_T: tl.constexpr, BS: tl.constexpr,
        D: tl.constexpr, USE_BITS: tl.constexpr, IEEE: tl.constexpr,
    ):
        # Q, DO and DQ share strides (the wrapper makes them contiguous).
        pid_t = tl.program_id(0)
        pid_bg = tl.program_id(1)
        b = (pid_bg // Hkv).to(tl.int64)
        g = (pid_bg % Hkv).to(tl.int64)
        t, rm, pos, h = _row_setup(QPOS, Tq, OFF, pid_t, g, G, GP, BLOCK_T)
        t64 = t.to(tl.int64)
        d = tl.arange(0, D)
        qoff = b * s_qb + h[:, None] * s_qh + t64[:, None] * s_qt + d[None, :]
        q = tl.load(Q + qoff, mask=rm[:, None], other=0.0)
        do = tl.load(DO + qoff, mask=rm[:, None], other=0.0)
        lse = tl.load(LSE + b * s_lb + h * s_lh + t64, mask=rm, other=1.0e30)
        delta = tl.load(DELTA + b * s_lb + h * s_lh + t64, mask=rm, other=0.0)
        sel = (pid_t * BLOCK_T) // SEL_T
        n = tl.load(COUNTS + b * s_nb + g * s_nh + sel)
        lst = LISTS + b * s_Lb + g * s_Lh + sel * s_Ls
        kbase = K + b * s_kb + g * s_kh
        vbase = V + b * s_vb + g * s_vh
        BM: tl.constexpr = GP * BLOCK_T
        dq = tl.zeros([BM, D], dtype=tl.float32)
        for i in range(n):
            jb = tl.load(lst + i)
            sk = jb * BS + tl.arange(0, BS)
            km = sk < Tk
            sk64 = sk.to(tl.int64)
            k = tl.load(kbase + sk64[:, None] * s_kt + d[None, :], mask=km[:, None], other=0.0)
            v = tl.load(vbase + sk64[:, None] * s_vt + d[None, :], mask=km[:, None], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * sm_scale2
            ok = (sk[None, :] <= pos[:, None]) & km[None, :] & rm[:, None]
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
        Q, K, V, DO, DK, DV, LSE, DELTA, QPOS, REV_OFF, REV_SEL, BITS,
        Tq, Tk, Hkv, NB, sm_scale2, sm_scale, OFF,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_lb, s_lh, s_bb, s_bh, s_bt,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, SEL_T: tl.constexpr, BS: tl.constexpr,
        D: tl.constexpr, USE_BITS: tl.constexpr, IEEE: tl.constexpr,
    ):
        # K, DK share strides; V, DV share strides (the wrapper makes them contiguous).
        jb = tl.program_id(0)
        pid_bg = tl.program_id(1)
        b = (pid_bg // Hkv).to(tl.int64)
        g = (pid_bg % Hkv).to(tl.int64)
        d = tl.arange(0, D)
        sk = jb * BS + tl.arange(0, BS)
        km = sk < Tk
        sk64 = sk.to(tl.int64)
        koff = b * s_kb + g * s_kh + sk64[:, None] * s_kt + d[None, :]
        voff = b * s_vb + g * s_vh + sk64[:, None] * s_vt + d[None, :]
        k = tl.load(K + koff, mask=km[:, None], other=0.0)
        v = tl.load(V + voff, mask=km[:, None], other=0.0)
        BM: tl.constexpr = GP * BLOCK_T
        dk = tl.zeros([BS, D], dtype=tl.float32)
        dv = tl.zeros([BS, D], dtype=tl.float32)
        key = pid_bg.to(tl.int64) * NB + jb
        start = tl.load(REV_OFF + key).to(tl.int32)
        end = tl.load(REV_OFF + key + 1).to(tl.int32)
        for e in range(start, end):
            sel = tl.load(REV_SEL + e)
            for st in range(SEL_T // BLOCK_T):
                pid_t = (sel * SEL_T) // BLOCK_T + st
                t, rm, pos, h = _row_setup(QPOS, Tq, OFF, pid_t, g, G, GP, BLOCK_T)
                t64 = t.to(tl.int64)
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

    # ------------------------------------------------------------------------------------------------------------------
    # Decode: one query token per sequence, four launches (logits, selection, split attention, combine).

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
                m_new = tl.maximum(m, tl.max(s, 1))
                l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
                m = m_new
        if COARSE:
            for c0 in range(0, CH // STEP2, BLOCK_C2):
                c = pid_c * (CH // STEP2) + c0 + tl.arange(0, BLOCK_C2)
                cm = c < NC2
                kc = tl.load(CK2 + b * s_c2b + g * s_c2h + c[:, None].to(tl.int64) * s_c2c + d[None, :],
                             mask=cm[:, None], other=0.0).to(tl.float32)
                s = _dot_f32(q, tl.trans(kc), IEEE) * sm_scale2
                vis = ((c * STRIDE2 + KERNEL2 - 1) <= pos) & cm
                s = tl.where(vis[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
                m = m_new
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
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m = m_new
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


# ----------------------------------------------------------------------------------------------------------------------
# Host side


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def supports(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, stride: int = 16) -> bool:
    """Whether the Triton path handles these shapes (otherwise callers use the reference)."""
    D = q.shape[-1]
    return (
        HAS_TRITON
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype
        and D in (16, 32, 64, 128, 256)
        and block_size >= 16
        and block_size & (block_size - 1) == 0
        and block_size % stride == 0
        and q.shape[1] % k.shape[1] == 0
    )


def compress_keys_triton(k: torch.Tensor, kernel: int = 32, stride: int = 16) -> torch.Tensor:
    """Mean-pool keys over windows: (B, H, T, D) -> (B, H, Nc, D) float32 (as `compress_keys`)."""
    B, H, T, D = k.shape
    n = 0 if T < kernel else (T - kernel) // stride + 1
    out = torch.empty(B, H, n, D, dtype=torch.float32, device=k.device)
    if n == 0:
        return out
    if k.stride(-1) != 1:
        k = k.contiguous()
    block_c = 32
    grid = (triton.cdiv(n, block_c), B * H)
    _compress_kernel[grid](k, out, n, H, k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1),
                           out.stride(2), KERNEL=kernel, STRIDE=stride, BLOCK_C=block_c, D=D)
    return out


def coarse_from_compressed(ckeys: torch.Tensor, kernel: int, stride: int, coarse_kernel: int = 128,
                           coarse_stride: int = 64) -> torch.Tensor:
    """Coarse keys K2 (mean over windows of `coarse_kernel`, step `coarse_stride`) built exactly from K1: the mean of
    the coarse_kernel/kernel non-overlapping K1 windows that tile each coarse window."""
    if coarse_kernel % kernel or coarse_stride % stride or kernel % stride:
        raise ValueError("coarse_kernel must be a multiple of kernel, coarse_stride of stride and kernel of stride")
    nc = ckeys.shape[2]
    span = (coarse_kernel // kernel - 1) * (kernel // stride)  # K1 index span of one coarse window
    step = coarse_stride // stride
    n2 = 0 if nc <= span else (nc - 1 - span) // step + 1
    if n2 == 0:
        return ckeys.new_zeros(ckeys.shape[0], ckeys.shape[1], 0, ckeys.shape[3])
    idx = torch.arange(n2, device=ckeys.device).view(-1, 1) * step + torch.arange(
        0, span + 1, kernel // stride, device=ckeys.device).view(1, -1)
    return ckeys[:, :, idx.view(-1)].view(ckeys.shape[0], ckeys.shape[1], n2, -1, ckeys.shape[3]).mean(3)


@dataclass
class Selection:
    """Key blocks per selection group of `sel_tokens` consecutive query tokens and KV group.

    lists (B, Hkv, S, W) int32 block indices (first `counts` valid, ascending); counts (B, Hkv, S) int32;
    bits (B, Hkv, Tq, ceil(NB/8)) uint8: per-token selection (token mode with several tokens per group), else None.
    Query token t belongs to group (t + offset) // sel_tokens (block mode: offset = q_pos[0] % sel_tokens, so groups
    are aligned to absolute positions); q_start = q_pos[0] where known (block mode), for the per-token causal limit.
    """

    lists: torch.Tensor
    counts: torch.Tensor
    bits: torch.Tensor | None
    sel_tokens: int
    num_blocks: int
    num_queries: int
    block_size: int
    offset: int = 0
    q_start: int | None = None
    _reverse: tuple | None = None

    def token_mask(self) -> torch.Tensor:
        """The selection as the reference's bool mask (B, Hkv, Tq, NB)."""
        nb, tq = self.num_blocks, self.num_queries
        if self.bits is not None:
            shifts = torch.arange(8, device=self.bits.device, dtype=torch.int32)
            m = ((self.bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1).bool()
            return m.flatten(-2)[..., :nb]
        B, H, S, W = self.lists.shape
        valid = torch.arange(W, device=self.lists.device) < self.counts.unsqueeze(-1)
        m = torch.zeros(B, H, S, nb + 1, dtype=torch.bool, device=self.lists.device)
        m.scatter_(-1, torch.where(valid, self.lists.long(), nb), True)
        t = torch.arange(tq, device=m.device)
        m = m[:, :, torch.div(t + self.offset, self.sel_tokens, rounding_mode="floor"), :nb]
        if self.q_start is not None:  # a token never reads a block after its own (attention masks it anyway)
            own = torch.div(t + self.q_start, self.block_size, rounding_mode="floor")
            m = m & (torch.arange(nb, device=m.device).view(1, -1) <= own.view(-1, 1))
        return m

    def reverse(self):
        """For each (b, g, key block), the selection groups that read it: (offsets, groups), CSR."""
        if self._reverse is None:
            B, H, S, W = self.lists.shape
            nb = self.num_blocks
            valid = torch.arange(W, device=self.lists.device) < self.counts.unsqueeze(-1)
            bg = torch.arange(B * H, device=self.lists.device).view(B, H, 1, 1)
            keys = (bg * nb + self.lists.long())[valid]
            groups = torch.arange(S, device=self.lists.device, dtype=torch.int32).view(1, 1, S, 1).expand(B, H, S, W)
            groups = groups[valid]
            order = torch.argsort(keys, stable=True)
            counts = torch.bincount(keys, minlength=B * H * nb)
            off = torch.zeros(B * H * nb + 1, dtype=torch.int64, device=keys.device)
            off[1:] = torch.cumsum(counts, 0)
            self._reverse = (off, groups[order].contiguous())
        return self._reverse


def _tiles(G: int, D: int, rows: int = 128) -> tuple[int, int]:
    """(GP, BLOCK_T): heads padded to a power of two, and tokens per tile so that GP * BLOCK_T ~ rows (>= 16)."""
    GP = _pow2(G)
    rows = rows if D <= 128 else rows // 2
    return GP, max(1, rows // GP, -(-16 // GP))


def _pool_blocks(scores: torch.Tensor, nb: int, block_size: int, kernel: int, stride: int) -> torch.Tensor:
    """Block score = max over the compressed keys overlapping each block: (..., Nc) -> (..., NB)."""
    R = block_size // stride
    E = -(-kernel // stride) - 1
    nc = scores.shape[-1]
    x = F.pad(scores, (E, nb * R - nc), value=float("-inf"))
    shape = x.shape[:-1]
    y = F.max_pool1d(x.reshape(-1, 1, x.shape[-1]), kernel_size=R + E, stride=R)
    return y.view(*shape, nb)


def _top_later_wins(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest float32 values along the last dim; equal values: the larger index first. One int64
    top-k over (order-preserving bits of the value) << 32 | index, cheaper than a stable sort of every row."""
    bits = (x.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    j = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return (bits * (1 << 32) + j).topk(k, dim=-1).indices


def _choose(block_scores, t_lo, t_hi, *, block_size, topk, init_blocks, local_blocks, dense_len, stable_ties):
    """Forced + top-k blocks per row: the reference's rule. t_lo/t_hi: (R,) first/last position of each row."""
    nb = block_scores.shape[-1]
    j = torch.arange(nb, device=block_scores.device).view(1, -1)
    own_lo = torch.div(t_lo, block_size, rounding_mode="floor").view(-1, 1)
    own_hi = torch.div(t_hi, block_size, rounding_mode="floor").view(-1, 1)
    visible = j <= own_hi
    forced = visible & ((j < init_blocks) | (j > own_lo - local_blocks))
    dense = ((t_lo.view(-1, 1) + 1) < dense_len) | ((own_lo + 1) <= topk)
    ranked = block_scores.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
    k_eff = min(topk, nb)
    if stable_ties:  # the reference's tie rule: equal scores, the later block wins (exact lexicographic key)
        top = _top_later_wins(ranked, k_eff)
    else:
        top = ranked.topk(k_eff, dim=-1).indices
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)
    return (chosen | forced | dense) & visible


def _mask_to_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., NB) bool -> ascending block lists (..., NB) int32 and counts (...) int32."""
    nb = mask.shape[-1]
    pos = torch.cumsum(mask, -1, dtype=torch.int32) - 1
    idx = torch.where(mask, pos, nb).long()
    j = torch.arange(nb, device=mask.device, dtype=torch.int32).expand(mask.shape)
    lists = torch.zeros(*mask.shape[:-1], nb + 1, dtype=torch.int32, device=mask.device)
    lists.scatter_(-1, idx, j)
    return lists[..., :nb].contiguous(), mask.sum(-1, dtype=torch.int32)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    nb = mask.shape[-1]
    nw = -(-nb // 8)
    m = F.pad(mask, (0, nw * 8 - nb)).view(*mask.shape[:-1], nw, 8).to(torch.int32)
    shifts = torch.arange(8, device=mask.device, dtype=torch.int32)
    return (m << shifts).sum(-1).to(torch.uint8)


def _launch_scores(q, ck, ck2, q_pos, out, *, scale, kernel, stride, kernel2, stride2, sel_tokens, per_token,
                   offset=0):
    B, Hq, Tq, D = q.shape
    Hkv = ck.shape[1]
    G = Hq // Hkv
    GP, block_t = _tiles(G, D)
    if per_token:
        block_t = max(min(block_t, _pow2(Tq)), -(-16 // GP))
        sel_tokens = block_t
    else:
        block_t = min(block_t, sel_tokens)
    block_c = 64 if D <= 128 else 32
    grid = (triton.cdiv(Tq + offset, block_t), B * Hkv)
    _select_scores_kernel[grid](
        q, ck, ck2, q_pos, out, Tq, ck.shape[2], ck2.shape[2], Hkv, scale * _LOG2E, offset,
        q.stride(0), q.stride(1), q.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        ck2.stride(0), ck2.stride(1), ck2.stride(2), out.stride(0), out.stride(1), out.stride(2),
        G=G, GP=GP, BLOCK_T=block_t, SEL_T=sel_tokens, BLOCK_C=block_c, D=D, KERNEL=kernel, STRIDE=stride,
        KERNEL2=kernel2, STRIDE2=stride2, PER_TOKEN=per_token, IEEE=q.dtype == torch.float32,
        num_warps=8 if GP * block_t >= 128 else 4,
    )


def select_blocks_triton(
    q: torch.Tensor,
    ckeys: torch.Tensor,
    q_pos: torch.Tensor,
    num_kv_blocks: int,
    *,
    scale: float,
    block_size: int = 64,
    kernel: int = 32,
    stride: int = 16,
    topk: int = 96,
    init_blocks: int = 1,
    local_blocks: int = 32,
    dense_len: int = 8192,
    selection: str = "token",
    select_tokens: int = 64,
    coarse: bool = False,
    coarse_kernel: int = 128,
    coarse_stride: int = 64,
    coarse_keys: torch.Tensor | None = None,
    max_score_elems: int = 1 << 28,
) -> Selection:
    """Block selection (see the module docstring). Returns a `Selection` for `block_sparse_attention_triton`.
    `coarse_keys`: cached K2 (B, Hkv, N2, D) for `coarse=True` (derived from `ckeys` when None)."""
    if selection not in ("token", "block"):
        raise ValueError(f"selection must be 'token' or 'block', got {selection!r}")
    B, Hq, Tq, D = q.shape
    Hkv = ckeys.shape[1]
    G = Hq // Hkv
    nb = num_kv_blocks
    device = q.device
    q_pos = q_pos.to(device=device, dtype=torch.int32).contiguous()
    q = q.detach()
    if q.stride(-1) != 1:
        q = q.contiguous()
    ck = ckeys.detach()  # float32 is fine: the kernel casts tiles to the query dtype as it loads them
    if ck.stride(-1) != 1:
        ck = ck.contiguous()
    if coarse:
        if coarse_keys is None:
            coarse_keys = coarse_from_compressed(ck, kernel, stride, coarse_kernel, coarse_stride)
        ck2 = coarse_keys.detach()
        if ck2.stride(-1) != 1:
            ck2 = ck2.contiguous()
        k2, s2 = coarse_kernel, coarse_stride
    else:
        ck2, k2, s2 = ck, kernel, stride
    nc = ck.shape[2]
    GP, block_t = _tiles(G, D)
    opts = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                dense_len=dense_len)
    if selection == "block" and Tq > 1:  # (one query: a group of one token, the same as token mode)
        if select_tokens < 16 or select_tokens & (select_tokens - 1):
            raise ValueError(f"select_tokens must be a power of two >= 16, got {select_tokens}")
        # Groups aligned to absolute positions (q_pos is consecutive: q_pos[0] + arange(Tq)); one host sync.
        p0 = int(q_pos[0])
        off = p0 % select_tokens
        S = -(-(Tq + off) // select_tokens)
        if nc > 0:
            scores = torch.zeros(B, Hkv, S, nc, dtype=torch.float32, device=device)
            _launch_scores(q, ck, ck2, q_pos, scores, scale=scale, kernel=kernel, stride=stride, kernel2=k2,
                           stride2=s2, sel_tokens=select_tokens, per_token=False, offset=off)
        else:
            scores = torch.zeros(B, Hkv, S, 0, dtype=torch.float32, device=device)
        g = torch.arange(S, device=device)
        t_lo = p0 + (g * select_tokens - off).clamp(min=0)
        t_hi = p0 + ((g + 1) * select_tokens - off).clamp(max=Tq) - 1
        i = torch.arange(nc, device=device).view(1, -1)
        scores = scores.masked_fill((i * stride + kernel - 1 > t_hi.view(-1, 1)), float("-inf"))
        block_scores = _pool_blocks(scores, nb, block_size, kernel, stride)
        mask = _choose(block_scores, t_lo, t_hi, stable_ties=True, **opts)
        lists, counts = _mask_to_lists(mask)
        return Selection(lists, counts, None, select_tokens, nb, Tq, block_size, offset=off, q_start=p0)
    # Per-token (exact) selection, in chunks of whole tiles so the (rows, Nc) score matrix stays bounded.
    sel_t = max(min(block_t, _pow2(Tq)), -(-16 // GP))
    per_chunk = max(sel_t, (max_score_elems // max(1, B * Hkv * max(nc, nb))) // sel_t * sel_t)
    lists_all, counts_all, bits_all = [], [], []
    for a in range(0, Tq, per_chunk):
        e = min(Tq, a + per_chunk)
        qa, pa = q[:, :, a:e], q_pos[a:e]
        if nc > 0:
            scores = torch.empty(B, Hkv, e - a, nc, dtype=torch.float32, device=device)
            _launch_scores(qa, ck, ck2, pa, scores, scale=scale, kernel=kernel, stride=stride, kernel2=k2,
                           stride2=s2, sel_tokens=sel_t, per_token=True)
            block_scores = _pool_blocks(scores, nb, block_size, kernel, stride)
        else:
            block_scores = torch.full((B, Hkv, e - a, nb), float("-inf"), device=device)
        mask = _choose(block_scores, pa.long(), pa.long(), stable_ties=True, **opts)
        if Tq == 1:  # decode: the one token's own selection, no per-row bits needed
            lists, counts = _mask_to_lists(mask)
        else:
            n_t = -(-(e - a) // sel_t)
            union = F.pad(mask, (0, 0, 0, n_t * sel_t - (e - a))).view(B, Hkv, n_t, sel_t, nb).any(3)
            lists, counts = _mask_to_lists(union)
            bits_all.append(_pack_bits(mask))
        lists_all.append(lists)
        counts_all.append(counts)
    lists = torch.cat(lists_all, 2) if len(lists_all) > 1 else lists_all[0]
    counts = torch.cat(counts_all, 2) if len(counts_all) > 1 else counts_all[0]
    bits = (torch.cat(bits_all, 2) if len(bits_all) > 1 else bits_all[0]) if bits_all else None
    return Selection(lists, counts, bits, sel_t, nb, Tq, block_size)


def _decode_plan(B: int, Hkv: int, nc: int, step2: int) -> tuple[int, int]:
    """(keys per logits program, attention splits): enough programs to fill the GPU (~1K), not more."""
    bh = B * Hkv
    ch = min(1024, max(64, 16 * step2, _pow2(-(-max(nc, 1) * bh // 1024))))
    nsplit = max(1, min(32, _pow2(-(-512 // bh))))
    return ch, nsplit


def _decode_select(q, ck, q_pos, nb, *, scale, block_size, kernel, stride, topk, init_blocks, local_blocks,
                   dense_len, coarse, coarse_kernel, coarse_stride, coarse_keys):
    """Launches 1-2 of the decode path: (lists (B*Hkv, NB) int32, counts (B*Hkv,) int32)."""
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


def decode_select_triton(q, ckeys, q_pos, num_kv_blocks, *, scale, block_size=64, kernel=32, stride=16, topk=96,
                         init_blocks=1, local_blocks=32, dense_len=8192, coarse=False, coarse_kernel=128,
                         coarse_stride=64, coarse_keys=None) -> Selection:
    """The decode path's selection for one query token (q (B, Hq, 1, D)), as a `Selection` (for tests and tools)."""
    B, Hkv = q.shape[0], ckeys.shape[1]
    lists, counts = _decode_select(
        q, ckeys, q_pos, num_kv_blocks, scale=scale, block_size=block_size, kernel=kernel, stride=stride, topk=topk,
        init_blocks=init_blocks, local_blocks=local_blocks, dense_len=dense_len, coarse=coarse,
        coarse_kernel=coarse_kernel, coarse_stride=coarse_stride, coarse_keys=coarse_keys)
    return Selection(lists.view(B, Hkv, 1, -1), counts.view(B, Hkv, 1), None, 1, num_kv_blocks, 1, block_size)


def decode_attention_triton(q, k, v, q_pos, ckeys, *, scale, block_size=64, kernel=32, stride=16, topk=96,
                            init_blocks=1, local_blocks=32, dense_len=8192, coarse=False, coarse_kernel=128,
                            coarse_stride=64, coarse_keys=None) -> torch.Tensor:
    """One new token per sequence (q (B, Hq, 1, D), position q_pos (1,)) against the cache k, v (B, Hkv, Tk, D) and
    its compressed keys: selection and attention in four launches, no host synchronisation (CUDA-graph safe).
    Same function as the per-token path; forward only."""
    B, Hq, _, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    RM = max(16, _pow2(G))
    nb = -(-Tk // block_size)
    lists, counts = _decode_select(
        q, ckeys, q_pos, nb, scale=scale, block_size=block_size, kernel=kernel, stride=stride, topk=topk,
        init_blocks=init_blocks, local_blocks=local_blocks, dense_len=dense_len, coarse=coarse,
        coarse_kernel=coarse_kernel, coarse_stride=coarse_stride, coarse_keys=coarse_keys)
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


def _fwd(q, k, v, q_pos, sel: Selection, scale: float):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    GP, block_t = _tiles(G, D)
    block_t = min(block_t, sel.sel_tokens)
    block_size = sel.block_size
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    bits = sel.bits if sel.bits is not None else sel.counts
    bs = sel.bits.stride() if sel.bits is not None else (0, 0, 0)
    grid = (triton.cdiv(Tq + sel.offset, block_t), B * Hkv)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, q_pos, sel.lists, sel.counts, bits, Tq, Tk, Hkv, scale * _LOG2E, sel.offset,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        sel.lists.stride(0), sel.lists.stride(1), sel.lists.stride(2), sel.counts.stride(0), sel.counts.stride(1),
        bs[0], bs[1], bs[2],
        G=G, GP=GP, BLOCK_T=block_t, SEL_T=sel.sel_tokens, BS=block_size, D=D, USE_BITS=sel.bits is not None,
        IEEE=q.dtype == torch.float32, num_warps=8 if GP * block_t >= 128 else 4, num_stages=3 if D <= 128 else 2,
    )
    return o, lse


def _bwd(q, k, v, o, lse, do, q_pos, sel: Selection, scale: float):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    GP, block_t = _tiles(G, D, rows=64)
    block_t = min(block_t, sel.sel_tokens)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    delta = (o.float() * do.float()).sum(-1)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    bits = sel.bits if sel.bits is not None else sel.counts
    bs = sel.bits.stride() if sel.bits is not None else (0, 0, 0)
    ieee = q.dtype == torch.float32
    common = dict(G=G, GP=GP, BLOCK_T=block_t, SEL_T=sel.sel_tokens, BS=sel.block_size, D=D,
                  USE_BITS=sel.bits is not None, IEEE=ieee, num_warps=4, num_stages=2)
    _attn_bwd_dq_kernel[(triton.cdiv(Tq + sel.offset, block_t), B * Hkv)](
        q, k, v, do, dq, lse, delta, q_pos, sel.lists, sel.counts, bits, Tq, Tk, Hkv, scale * _LOG2E, scale,
        sel.offset,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), lse.stride(0), lse.stride(1), sel.lists.stride(0), sel.lists.stride(1), sel.lists.stride(2),
        sel.counts.stride(0), sel.counts.stride(1), bs[0], bs[1], bs[2], **common,
    )
    off, groups = sel.reverse()
    _attn_bwd_dkdv_kernel[(sel.num_blocks, B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, q_pos, off, groups, bits, Tq, Tk, Hkv, sel.num_blocks, scale * _LOG2E,
        scale, sel.offset, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), lse.stride(0), lse.stride(1), bs[0], bs[1], bs[2], **common,
    )
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, sel, scale):
        o, lse = _fwd(q, k, v, q_pos, sel, scale)
        ctx.save_for_backward(q, k, v, o, lse, q_pos)
        ctx.sel = sel
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_pos = ctx.saved_tensors
        dq, dk, dv = _bwd(q, k, v, o, lse, do, q_pos, ctx.sel, ctx.scale)
        return dq, dk, dv, None, None, None


def block_sparse_attention_triton(q, k, v, q_pos, sel: Selection, *, scale: float,
                                  block_size: int | None = None) -> torch.Tensor:
    """Softmax attention of each query over the tokens of its selected blocks, causal; differentiable in q, k, v."""
    if block_size is not None and block_size != sel.block_size:
        raise ValueError(f"block_size {block_size} differs from the selection's {sel.block_size}")
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    return _BlockSparseAttention.apply(q, k, v, q_pos, sel, scale)


def _dense(q, k, v, q_pos, scale):
    """Dense causal attention (SDPA; flash with is_causal when every key is a query)."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if Tq == 1 and int(q_pos[-1]) == Tk - 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    s = torch.arange(Tk, device=q.device)
    causal = s.view(1, -1) <= q_pos.view(-1, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=gqa)


def infllm_v2_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    ckeys: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    block_size: int = 64,
    kernel: int = 32,
    stride: int = 16,
    topk: int = 96,
    init_blocks: int = 1,
    local_blocks: int = 32,
    dense_len: int = 8192,
    selection: str = "token",
    select_tokens: int = 64,
    coarse: bool = False,
    coarse_kernel: int = 128,
    coarse_stride: int = 64,
    coarse_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """`infllm_v2_attention` on the Triton kernels (dense SDPA while every query is short)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    Tk = k.shape[2]
    num_blocks = -(-Tk // block_size)
    if Tk < dense_len or num_blocks <= topk:
        return _dense(q, k, v, q_pos, scale)
    if ckeys is None:
        ckeys = compress_keys_triton(k.detach(), kernel, stride)
    if q.shape[2] == 1 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Decode (one token: block mode is the same function): fused path, four launches.
        if q.stride(-1) != 1:
            q = q.contiguous()
        ck = ckeys if ckeys.stride(-1) == 1 else ckeys.contiguous()
        return decode_attention_triton(
            q, k if k.stride(-1) == 1 else k.contiguous(), v if v.stride(-1) == 1 else v.contiguous(), q_pos, ck,
            scale=scale, block_size=block_size, kernel=kernel, stride=stride, topk=topk, init_blocks=init_blocks,
            local_blocks=local_blocks, dense_len=dense_len, coarse=coarse, coarse_kernel=coarse_kernel,
            coarse_stride=coarse_stride, coarse_keys=coarse_keys)
    sel = select_blocks_triton(
        q, ckeys, q_pos, num_blocks, scale=scale, block_size=block_size, kernel=kernel, stride=stride, topk=topk,
        init_blocks=init_blocks, local_blocks=local_blocks, dense_len=dense_len, selection=selection,
        select_tokens=select_tokens, coarse=coarse, coarse_kernel=coarse_kernel, coarse_stride=coarse_stride,
        coarse_keys=coarse_keys,
    )
    return block_sparse_attention_triton(q, k, v, q_pos, sel, scale=scale)
