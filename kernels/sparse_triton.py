"""InfLLM-V2 block-sparse attention in Triton: block selection, sparse attention forward/backward and decode.

Computes the function of `sparse_reference.py` (same arguments; that file is the spec):

1. `compress_keys_triton`: K1_i = mean(K[stride*i : stride*i + kernel]) in float32 (per document when packed).
2. Selection, two modes (option `selection`, both defined in sparse_reference.py):
   - "block": queries grouped by position, group = position // `select_tokens` (default 64 = one key block's worth of
     queries); the call's tokens of a group share one selection. Two launches, no score matrix per token:
     `_block_scores_kernel`, one program per (group, KV group) holding ALL the group's (head, token) query rows as one
     bf16 matrix: pass 1 keeps each row's softmax normaliser (log-sum-exp over K1, or over the coarse K2 with
     `coarse`), pass 2 runs transposed (keys x rows, bf16 tensor-core products, fp32 accumulation) so that the sum of
     the probabilities over the group's rows is a register-axis reduction; it writes one fp32 score per (group, K1
     key). Keys every row sees skip the causal mask; dense groups skip both passes. Then `_block_topk_kernel`, one
     program per (group, KV group): block max-pool over the overlapping K1 keys, forced init/local blocks, dense rule,
     exact top-k by bisection on the order-preserving integer image of the scores (ties: the later block), ascending
     block list. Groups are aligned to positions (one host read of q_pos[0]); q_pos must be consecutive.
   - "token" (default): each query token has its own selection: `_select_scores_kernel` writes per-token group scores
     (two passes as above, fp32 rows x keys), then max-pool / top-k in PyTorch; the attention tiles walk the union of
     their tokens' selections and mask per token (a bitset per token).
   Option `coarse`: the score softmax's normaliser from K2 (`coarse_from_compressed`), InfLLM-V2's approximation.
3. `_attn_fwd_kernel` / `_attn_bwd_dq_kernel` / `_attn_bwd_dkdv_kernel`: flash-attention style kernels over a list of
   key blocks per row table entry (a "row": consecutive queries of one document sharing one list) and KV group. All
   query heads of a group are rows of one tile, so each K/V block is read once per group and tile. The leading list
   entries that every row of a tile sees whole run without a mask; causal mask inside the own block(s); fp32 softmax
   and accumulation, exp2 arithmetic. dk/dv use the transposed lists (for each key block, the rows that read it), so
   no atomics.
4. Packed documents (`cu_seqlens`, B == 1): row and key-block tables map every row and key block to its document
   (key offset, K1/K2 offsets, length), so compression, block selection and attention forward/backward handle all
   documents in the same launches; each document has its own positions, compressed keys, init/local blocks and block
   grid, and never sees another. Token mode runs one document at a time unless every document is dense.

Decode (`decode_attention_triton`, taken by `infllm_v2_attention_triton` for one query token without gradients): four
launches, no host synchronisation (CUDA-graph safe): (1) split-key logits of every head against K1 in float32 (3 tf32
tensor-core products) plus per-chunk softmax statistics (over K2 with `coarse`; without cached `coarse_keys`, K2 is
first derived from K1 by a few PyTorch ops); (2) one program per (sequence, KV group): normaliser, group-summed
probabilities, block max-pool, forced blocks and the bisection top-k; (3) split attention over the listed blocks;
(4) combine. Batch B >= 1 shares q_pos, like the reference. Speed: bench/RESULTS.md, "Sparse kernels".
`tuning` (a dict, optional everywhere): tile sizes / warps / stages of the prefill kernels (see bench_sparse.py).
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
    def _lse_step(s2, m, l):
        """Fold base-2 scores s2 (rows x keys, -inf where hidden) into the running row max m and sum l."""
        m_new = tl.maximum(m, tl.max(s2, 1))
        return m_new, l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), 1)

    @triton.jit
    def _attend_step(s2, v, m, l, acc, IEEE: tl.constexpr):
        """One online-softmax step: fold base-2 scores s2 of a key tile and its values v into (m, l, acc)."""
        m_new = tl.maximum(m, tl.max(s2, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s2 - m_new[:, None])
        return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)

    @triton.jit
    def _compress_kernel(
        K, O, STARTS, NC, H, s_kb, s_kh, s_kt, s_ob, s_oh, s_oc,
        KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr,
        USE_STARTS: tl.constexpr,
    ):
        # Compressed key c = mean of KERNEL keys from token start(c): c * STRIDE, or STARTS[c] (packed documents).
        pid_c = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        d = tl.arange(0, D)
        cm = c < NC
        if USE_STARTS:
            start = tl.load(STARTS + c, mask=cm, other=0).to(tl.int64)
        else:
            start = (c * STRIDE).to(tl.int64)
        base = K + b * s_kb + h * s_kh
        acc = tl.zeros([BLOCK_C, D], dtype=tl.float32)
        for w in range(KERNEL):
            acc += tl.load(base + (start + w)[:, None] * s_kt + d[None, :], mask=cm[:, None], other=0.0).to(tl.float32)
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
            m, l = _lse_step(s, m, l)
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

    # ------------------------------------------------------------------------------------------------------------------
    # Row tables. A "row" is a run of consecutive query tokens of one document sharing one block list (block mode: a
    # selection group; token mode: a tile, with per-token bits). ROWS (R, 8) int32: first query index t0, token
    # count n, key offset k0 of the document (key index = k0 + position), first global key block kb0 of the document,
    # compressed-key offsets c0 (K1) and c20 (K2) of the document, document length, unused. Positions (QPOS) are
    # relative to the document start. KBT (NBtot, 4) int32 per global key block: k0, local block index, document length.

    @triton.jit
    def _block_scores_kernel(
        Q, CK, CK2, QPOS, ROWS, OUT,
        Hkv, sm_scale2, dense_len, topk,
        s_qb, s_qh, s_qt, s_cb, s_ch, s_cc, s_c2b, s_c2h, s_c2c, s_ob, s_oh, s_or,
        G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, NSUB: tl.constexpr, BLOCK_C: tl.constexpr,
        D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, KERNEL2: tl.constexpr, STRIDE2: tl.constexpr,
        BS: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr, PIPE: tl.constexpr,
    ):
        # Block mode, one program per (row, KV group) (or per share of a row's tokens when NSUB > 1, then summed with
        # atomics). Rows of the matrix: every (head of the group, token of the row). Pass 1: per-row log-sum-exp over
        # the visible K1 (or coarse K2) keys. Pass 2, transposed (keys x rows) so that the sum over rows is a
        # reduction along the register axis: OUT[row, c] = sum over the rows of softmax probability of K1 key c.
        # Keys visible to every row of the tile skip the mask. Dense rows (all blocks kept) skip both passes.
        pid = tl.program_id(0)
        bg = tl.program_id(1)
        row = pid // NSUB
        sub = pid % NSUB
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        t0 = tl.load(ROWS + row * 8)
        n = tl.load(ROWS + row * 8 + 1)
        c0 = tl.load(ROWS + row * 8 + 4).to(tl.int64)
        c20 = tl.load(ROWS + row * 8 + 5).to(tl.int64)
        p_first = tl.load(QPOS + t0)
        dense = ((p_first + 1) < dense_len) | ((p_first // BS + 1) <= topk)
        BM: tl.constexpr = GP * BLOCK_T
        r = tl.arange(0, BM)
        hh = r // BLOCK_T
        i = sub * BLOCK_T + r % BLOCK_T
        rm = (hh < G) & (i < n)
        pos = tl.load(QPOS + t0 + i, mask=rm, other=-1)
        pmax = tl.max(pos, 0)
        pmin = tl.min(tl.where(rm, pos, 1 << 30), 0)
        nv = tl.where(pmax >= KERNEL - 1, (pmax - KERNEL + 1) // STRIDE + 1, 0)
        nv = tl.where(dense, 0, nv)
        nf = tl.minimum(tl.where(pmin >= KERNEL - 1, (pmin - KERNEL + 1) // STRIDE + 1, 0), nv)
        nv2 = tl.where(pmax >= KERNEL2 - 1, (pmax - KERNEL2 + 1) // STRIDE2 + 1, 0)
        nv2 = tl.where(nv > 0, nv2, 0)
        nf2 = tl.minimum(tl.where(pmin >= KERNEL2 - 1, (pmin - KERNEL2 + 1) // STRIDE2 + 1, 0), nv2)
        d = tl.arange(0, D)
        h = (g * G + hh).to(tl.int64)
        q = tl.load(Q + b * s_qb + h[:, None] * s_qh + (t0 + i)[:, None].to(tl.int64) * s_qt + d[None, :],
                    mask=rm[:, None], other=0.0)
        # Pass 1: log-sum-exp (base 2) per row.
        m = tl.full([BM], -1.0e30, dtype=tl.float32)
        l = tl.zeros([BM], dtype=tl.float32)
        ck2 = CK2 + b * s_c2b + g * s_c2h + c20 * s_c2c
        nf2c = (nf2 // BLOCK_C) * BLOCK_C
        for cs in range(0, nf2c, BLOCK_C):
            c = cs + tl.arange(0, BLOCK_C)
            kc = tl.load(ck2 + c[:, None].to(tl.int64) * s_c2c + d[None, :]).to(q.dtype)
            s = _dot(q, tl.trans(kc), IEEE)
            m, l = _lse_step(s * sm_scale2, m, l)
        for cs in range(nf2c, nv2, BLOCK_C):
            c = cs + tl.arange(0, BLOCK_C)
            kc = tl.load(ck2 + c[:, None].to(tl.int64) * s_c2c + d[None, :], mask=(c < nv2)[:, None],
                         other=0.0).to(q.dtype)
            s = _dot(q, tl.trans(kc), IEEE)
            s = tl.where((c[None, :] * STRIDE2 + KERNEL2 - 1) <= pos[:, None], s, float("-inf"))
            m, l = _lse_step(s * sm_scale2, m, l)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), 0.0)  # no (coarse) key visible: unnormalised
        lse = tl.where(rm, lse, 1.0e30)  # padded rows contribute nothing
        # Pass 2 (keys x rows): group-summed probabilities.
        qt = tl.trans(q)
        ck = CK + b * s_cb + g * s_ch + c0 * s_cc
        out = OUT + b * s_ob + g * s_oh + row.to(tl.int64) * s_or
        nfc = (nf // BLOCK_C) * BLOCK_C
        if PIPE:  # the next chunk's product is issued before this chunk's exponentials (overlap MMA and MUFU)
            cb = tl.arange(0, BLOCK_C)
            st = _dot(tl.load(ck + cb[:, None].to(tl.int64) * s_cc + d[None, :], mask=(cb < nfc)[:, None],
                              other=0.0).to(q.dtype), qt, IEEE)
            for cs in range(BLOCK_C, nfc + BLOCK_C, BLOCK_C):
                c = cs + cb
                kn = tl.load(ck + c[:, None].to(tl.int64) * s_cc + d[None, :], mask=(c < nfc)[:, None],
                             other=0.0).to(q.dtype)
                st_n = _dot(kn, qt, IEEE)
                ps = tl.sum(tl.exp2(st * sm_scale2 - lse[None, :]), 1)
                if ATOMIC:
                    tl.atomic_add(out + c - BLOCK_C, ps)
                else:
                    tl.store(out + c - BLOCK_C, ps)
                st = st_n
        else:
            for cs in range(0, nfc, BLOCK_C):
                c = cs + tl.arange(0, BLOCK_C)
                kc = tl.load(ck + c[:, None].to(tl.int64) * s_cc + d[None, :]).to(q.dtype)
                st = _dot(kc, qt, IEEE) * sm_scale2
                ps = tl.sum(tl.exp2(st - lse[None, :]), 1)
                if ATOMIC:
                    tl.atomic_add(out + c, ps)
                else:
                    tl.store(out + c, ps)
        for cs in range(nfc, nv, BLOCK_C):
            c = cs + tl.arange(0, BLOCK_C)
            cm = c < nv
            kc = tl.load(ck + c[:, None].to(tl.int64) * s_cc + d[None, :], mask=cm[:, None], other=0.0).to(q.dtype)
            st = _dot(kc, qt, IEEE) * sm_scale2
            vis = (c[:, None] * STRIDE + KERNEL - 1) <= pos[None, :]
            ps = tl.sum(tl.where(vis, tl.exp2(st - lse[None, :]), 0.0), 1)
            if ATOMIC:
                tl.atomic_add(out + c, ps, mask=cm)
            else:
                tl.store(out + c, ps, mask=cm)

    @triton.jit
    def _block_topk_kernel(
        SC, QPOS, ROWS, LISTS, COUNTS,
        Hkv, k_eff, topk, init_blocks, local_blocks, dense_len,
        s_sb, s_sh, s_sr, s_Lb, s_Lh, s_Lr, s_nb, s_nh,
        NBP: tl.constexpr, LOG_NBP: tl.constexpr, WIDTH: tl.constexpr, BS: tl.constexpr, KERNEL: tl.constexpr,
        STRIDE: tl.constexpr,
    ):
        # One program per (row, KV group): block score = max over the visible K1 keys overlapping the block, forced
        # init/local blocks, every visible block for a dense row, else an exact top-k by bisection on the
        # order-preserving integer image of the scores (ties: the later block). Writes an ascending block list.
        row = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        t0 = tl.load(ROWS + row * 8)
        n = tl.load(ROWS + row * 8 + 1)
        p_lo = tl.load(QPOS + t0)
        p_hi = tl.load(QPOS + t0 + n - 1)
        own_lo = p_lo // BS
        own_hi = p_hi // BS
        nv = tl.where(p_hi >= KERNEL - 1, (p_hi - KERNEL + 1) // STRIDE + 1, 0)
        dense = ((p_lo + 1) < dense_len) | ((own_lo + 1) <= topk)
        nv = tl.where(dense, 0, nv)  # a dense row reads no score
        j = tl.arange(0, NBP)
        vis_b = j <= own_hi
        lo = tl.where(j * BS >= KERNEL, (j * BS - KERNEL) // STRIDE + 1, 0)
        hi = ((j + 1) * BS - 1) // STRIDE
        base = SC + b * s_sb + g * s_sh + row.to(tl.int64) * s_sr
        acc = tl.full([NBP], float("-inf"), dtype=tl.float32)
        for w in range(WIDTH):
            ii = lo + w
            ok = vis_b & (ii <= hi) & (ii < nv)
            acc = tl.maximum(acc, tl.load(base + ii, mask=ok, other=float("-inf")))
        forced = vis_b & ((j < init_blocks) | (j > own_lo - local_blocks))
        ranked = tl.where(forced, float("inf"), acc)
        bits = ranked.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # order-preserving integer image
        key = tl.where(vis_b, key, -(1 << 40))
        lo_k = tl.full([], (1 << 31) + 1, dtype=tl.int64)  # dense rows: nothing chosen by rank
        lo_m = tl.full([], 0, dtype=tl.int32)
        if dense == 0:
            lo_k = tl.full([], -(1 << 34), dtype=tl.int64)
            hi_k = tl.full([], (1 << 31) + 1, dtype=tl.int64)
            for _ in range(36):  # the k_eff-th largest key: largest thr with #(key >= thr) >= k_eff
                mid = lo_k + (hi_k - lo_k) // 2
                ge = tl.sum((key >= mid).to(tl.int32), 0) >= k_eff
                lo_k = tl.where(ge, mid, lo_k)
                hi_k = tl.where(ge, hi_k, mid)
            need = k_eff - tl.sum((key > lo_k).to(tl.int32), 0)
            hi_m = tl.full([], NBP, dtype=tl.int32)
            for _ in range(LOG_NBP + 1):  # among the blocks tied at the threshold, the `need` latest
                mid = lo_m + (hi_m - lo_m) // 2
                ge = tl.sum(((key == lo_k) & (j >= mid)).to(tl.int32), 0) >= need
                lo_m = tl.where(ge, mid, lo_m)
                hi_m = tl.where(ge, hi_m, mid)
        chosen = (key > lo_k) | ((key == lo_k) & (j >= lo_m))
        final = (chosen | forced | dense) & vis_b
        fi = final.to(tl.int32)
        slot = tl.cumsum(fi, 0) - 1
        tl.store(LISTS + b * s_Lb + g * s_Lh + row.to(tl.int64) * s_Lr + slot, j, mask=fi != 0)
        tl.store(COUNTS + b * s_nb + g * s_nh + row, tl.sum(fi, 0))

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


def _count(length, kernel: int, stride: int):
    """Complete windows of `kernel` at step `stride` in `length` tokens (int or CPU int64 tensor)."""
    if isinstance(length, torch.Tensor):
        return torch.where(length >= kernel, torch.div(length - kernel, stride, rounding_mode="floor") + 1, 0)
    return 0 if length < kernel else (length - kernel) // stride + 1


def _documents(cu_seqlens, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents: (starts, lengths) as CPU int64 tensors, validated against the packed length."""
    cu = torch.as_tensor(cu_seqlens).detach().to("cpu", torch.int64).view(-1)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {cu.tolist()[:8]}...")
    return cu[:-1], cu[1:] - cu[:-1]


def _coarse_count(nc, kernel: int, stride: int, coarse_kernel: int, coarse_stride: int):
    span = (coarse_kernel // kernel - 1) * (kernel // stride)
    step = coarse_stride // stride
    if isinstance(nc, torch.Tensor):
        return torch.where(nc > span, torch.div(nc - 1 - span, step, rounding_mode="floor") + 1, 0)
    return 0 if nc <= span else (nc - 1 - span) // step + 1


def compress_keys_triton(k: torch.Tensor, kernel: int = 32, stride: int = 16, cu_seqlens=None) -> torch.Tensor:
    """Mean-pool keys over windows: (B, H, T, D) -> (B, H, Nc, D) float32 (as `compress_keys`). With `cu_seqlens`
    (packed documents, B == 1) each document is pooled on its own and the results are concatenated."""
    B, H, T, D = k.shape
    starts = None
    if cu_seqlens is None:
        n = _count(T, kernel, stride)
    else:
        a, L = _documents(cu_seqlens, T)
        nc = _count(L, kernel, stride)
        n = int(nc.sum())
        first = torch.cumsum(nc, 0) - nc
        doc = torch.repeat_interleave(torch.arange(len(nc)), nc)
        starts = (a[doc] + (torch.arange(n) - first[doc]) * stride).to(device=k.device, dtype=torch.int32)
    out = torch.empty(B, H, n, D, dtype=torch.float32, device=k.device)
    if n == 0:
        return out
    if k.stride(-1) != 1:
        k = k.contiguous()
    block_c = 32
    grid = (triton.cdiv(n, block_c), B * H)
    _compress_kernel[grid](k, out, starts if starts is not None else out, n, H, k.stride(0), k.stride(1), k.stride(2),
                           out.stride(0), out.stride(1), out.stride(2), KERNEL=kernel, STRIDE=stride, BLOCK_C=block_c,
                           D=D, USE_STARTS=starts is not None)
    return out


def coarse_from_compressed(ckeys: torch.Tensor, kernel: int, stride: int, coarse_kernel: int = 128,
                           coarse_stride: int = 64, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Coarse keys K2 (mean over windows of `coarse_kernel`, step `coarse_stride`) built exactly from K1: the mean of
    the coarse_kernel/kernel non-overlapping K1 windows that tile each coarse window. `counts`: K1 keys per packed
    document (CPU int64; K1 concatenated over documents), each document's K2 from its own K1, concatenated."""
    if coarse_kernel % kernel or coarse_stride % stride or kernel % stride:
        raise ValueError("coarse_kernel must be a multiple of kernel, coarse_stride of stride and kernel of stride")
    span = (coarse_kernel // kernel - 1) * (kernel // stride)  # K1 index span of one coarse window
    step = coarse_stride // stride
    nc = ckeys.shape[2] if counts is None else counts
    n2 = _coarse_count(nc, kernel, stride, coarse_kernel, coarse_stride)
    dev = ckeys.device
    if counts is None:  # built on the device: no host copy (the decode step is captured in CUDA graphs)
        first = torch.arange(n2, device=dev) * step
    else:
        c0 = torch.cumsum(counts, 0) - counts
        doc = torch.repeat_interleave(torch.arange(len(counts)), n2)
        first = (c0[doc] + (torch.arange(int(n2.sum())) - (torch.cumsum(n2, 0) - n2)[doc]) * step).to(dev)
    total = int(first.numel())
    if total == 0:
        return ckeys.new_zeros(ckeys.shape[0], ckeys.shape[1], 0, ckeys.shape[3])
    idx = first.view(-1, 1) + torch.arange(0, span + 1, kernel // stride, device=dev).view(1, -1)
    return ckeys[:, :, idx.view(-1)].view(ckeys.shape[0], ckeys.shape[1], total, -1, ckeys.shape[3]).mean(3)


def _rows_single(Tq: int, row_tokens: int, offset: int, device) -> torch.Tensor:
    """Row table of one sequence: rows of `row_tokens` queries, the first shortened by `offset` (alignment)."""
    S = -(-(Tq + offset) // row_tokens)
    g = torch.arange(S, device=device)
    t0 = (g * row_tokens - offset).clamp(min=0)
    t1 = ((g + 1) * row_tokens - offset).clamp(max=Tq)
    rows = torch.zeros(S, 8, dtype=torch.int32, device=device)
    rows[:, 0], rows[:, 1] = t0, t1 - t0
    return rows


@dataclass
class _Packed:
    """Packed documents laid out for the kernels (see the ROWS/KBT comment above the kernels)."""

    rows: torch.Tensor  # (R, 8) int32, rows of `row_tokens` per document
    key_blocks: torch.Tensor  # (NBT, 4) int32
    q_pos: torch.Tensor  # (T,) int32 positions within the document
    num_blocks: int  # blocks of the longest document
    max_compressed: int  # K1 keys of the longest document
    counts: torch.Tensor  # K1 keys per document (CPU int64)


def _pack(cu_seqlens, T: int, row_tokens: int, block_size: int, kernel: int, stride: int, kernel2: int,
          stride2: int, device) -> _Packed:
    a, L = _documents(cu_seqlens, T)
    nd = len(L)
    nr = -torch.div(-L, row_tokens, rounding_mode="floor")
    nb = -torch.div(-L, block_size, rounding_mode="floor")
    nc = _count(L, kernel, stride)
    n2 = _coarse_count(nc, kernel, stride, kernel2, stride2)
    doc = torch.repeat_interleave(torch.arange(nd), nr)
    g = torch.arange(int(nr.sum())) - (torch.cumsum(nr, 0) - nr)[doc]
    kb0, c0, c20 = (torch.cumsum(x, 0) - x for x in (nb, nc, n2))
    rows = torch.stack([a[doc] + g * row_tokens, torch.minimum(L[doc] - g * row_tokens, torch.tensor(row_tokens)),
                        a[doc], kb0[doc], c0[doc], c20[doc], L[doc], torch.zeros_like(g)], 1)
    kdoc = torch.repeat_interleave(torch.arange(nd), nb)
    jb = torch.arange(int(nb.sum())) - kb0[kdoc]
    kbt = torch.stack([a[kdoc], jb, L[kdoc], torch.zeros_like(jb)], 1)
    q_pos = torch.arange(T) - torch.repeat_interleave(a, L)
    return _Packed(rows.to(device, torch.int32), kbt.to(device, torch.int32), q_pos.to(device, torch.int32),
                   int(nb.max()) if nd else 0, int(nc.max()) if nd else 0, nc)


@dataclass
class Selection:
    """Key blocks per row (a run of consecutive query tokens of one document, see the kernels' row tables) and KV
    group.

    lists (B, Hkv, R, W) int32 local block indices (first `counts` valid, ascending); counts (B, Hkv, R) int32;
    bits (B, Hkv, Tq, ceil(NB/8)) uint8: per-token selection (token mode with several tokens per row), else None;
    rows (R, 8) int32; q_pos (Tq,) int32 positions within the document; key_blocks (NBT, 4) int32 for packed
    documents (None: one sequence, key block j = keys 64j..); num_blocks: blocks of the longest document.
    """

    lists: torch.Tensor
    counts: torch.Tensor
    bits: torch.Tensor | None
    rows: torch.Tensor
    q_pos: torch.Tensor
    row_tokens: int
    num_blocks: int
    block_size: int
    key_blocks: torch.Tensor | None = None
    _reverse: tuple | None = None

    def token_mask(self) -> torch.Tensor:
        """The selection as the reference's bool mask (B, Hkv, Tq, NB), NB = blocks of the longest document."""
        nb = self.num_blocks
        if self.bits is not None:
            shifts = torch.arange(8, device=self.bits.device, dtype=torch.int32)
            m = ((self.bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1).bool()
            return m.flatten(-2)[..., :nb]
        B, H, R, W = self.lists.shape
        valid = torch.arange(W, device=self.lists.device) < self.counts.unsqueeze(-1)
        m = torch.zeros(B, H, R, nb + 1, dtype=torch.bool, device=self.lists.device)
        m.scatter_(-1, torch.where(valid, self.lists.long(), nb), True)
        row_of = torch.repeat_interleave(torch.arange(R, device=m.device), self.rows[:, 1].long())
        own = torch.div(self.q_pos.long(), self.block_size, rounding_mode="floor")
        return m[:, :, row_of, :nb] & (torch.arange(nb, device=m.device).view(1, -1) <= own.view(-1, 1))

    def key_table(self, Tk: int) -> torch.Tensor:
        """(NBT, 4) per global key block: key offset, local block, document length."""
        if self.key_blocks is not None:
            return self.key_blocks
        nb = -(-Tk // self.block_size)
        kbt = torch.zeros(nb, 4, dtype=torch.int32, device=self.lists.device)
        kbt[:, 1] = torch.arange(nb, device=kbt.device)
        kbt[:, 2] = Tk
        return kbt

    def reverse(self, nbt: int):
        """For each (b, g, global key block), the rows that read it: (offsets, rows), CSR."""
        if self._reverse is None:
            B, H, R, W = self.lists.shape
            dev = self.lists.device
            valid = torch.arange(W, device=dev) < self.counts.unsqueeze(-1)
            bg = torch.arange(B * H, device=dev).view(B, H, 1, 1)
            keys = (bg * nbt + self.rows[:, 3].long().view(1, 1, R, 1) + self.lists.long())[valid]
            rows = torch.arange(R, device=dev, dtype=torch.int32).view(1, 1, R, 1).expand(B, H, R, W)[valid]
            order = torch.argsort(keys, stable=True)
            counts = torch.bincount(keys, minlength=B * H * nbt)
            off = torch.zeros(B * H * nbt + 1, dtype=torch.int64, device=dev)
            off[1:] = torch.cumsum(counts, 0)
            self._reverse = (off, rows[order].contiguous())
        return self._reverse


def _launch_extra(tuning: dict, part: str) -> dict:
    """Optional launch options from `tuning` (e.g. {"fwd_maxnreg": 128}): a register cap per thread."""
    cap = tuning.get(f"{part}_maxnreg")
    return {} if cap is None else {"maxnreg": cap}


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


def _choose(block_scores, t_lo, t_hi, *, block_size, topk, init_blocks, local_blocks, dense_len):
    """Forced + top-k blocks per row: the reference's rule. t_lo/t_hi: (R,) first/last position of each row."""
    nb = block_scores.shape[-1]
    j = torch.arange(nb, device=block_scores.device).view(1, -1)
    own_lo = torch.div(t_lo, block_size, rounding_mode="floor").view(-1, 1)
    own_hi = torch.div(t_hi, block_size, rounding_mode="floor").view(-1, 1)
    visible = j <= own_hi
    forced = visible & ((j < init_blocks) | (j > own_lo - local_blocks))
    dense = ((t_lo.view(-1, 1) + 1) < dense_len) | ((own_lo + 1) <= topk)
    ranked = block_scores.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
    top = _top_later_wins(ranked, min(topk, nb))  # the reference's tie rule: equal scores, the later block wins
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


def _launch_token_scores(q, ck, ck2, q_pos, out, *, scale, kernel, stride, kernel2, stride2):
    """Token mode: per-token group-summed probabilities (B, Hkv, Tq, Nc), -inf where invisible."""
    B, Hq, Tq, D = q.shape
    Hkv = ck.shape[1]
    G = Hq // Hkv
    GP, block_t = _tiles(G, D)
    block_t = max(min(block_t, _pow2(Tq)), -(-16 // GP))
    grid = (triton.cdiv(Tq, block_t), B * Hkv)
    _select_scores_kernel[grid](
        q, ck, ck2, q_pos, out, Tq, ck.shape[2], ck2.shape[2], Hkv, scale * _LOG2E, 0,
        q.stride(0), q.stride(1), q.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        ck2.stride(0), ck2.stride(1), ck2.stride(2), out.stride(0), out.stride(1), out.stride(2),
        G=G, GP=GP, BLOCK_T=block_t, SEL_T=block_t, BLOCK_C=64 if D <= 128 else 32, D=D, KERNEL=kernel,
        STRIDE=stride, KERNEL2=kernel2, STRIDE2=stride2, PER_TOKEN=True, IEEE=q.dtype == torch.float32,
        num_warps=8 if GP * block_t >= 128 else 4,
    )


def _select_rows(q, ck, ck2, q_pos, rows, nb_max, nc_max, *, scale, block_size, kernel, stride, kernel2, stride2,
                 topk, init_blocks, local_blocks, dense_len, row_tokens, tuning):
    """Block mode selection over a row table: two launches (group scores, then pool + top-k). -> lists, counts."""
    B, Hq, Tq, D = q.shape
    Hkv = ck.shape[1]
    G = Hq // Hkv
    R = rows.shape[0]
    dev = q.device
    GP, bt = _tiles(G, D, rows=tuning.get("sel_rows", 256))
    bt = min(bt, row_tokens)
    nsub = -(-row_tokens // bt)
    scores = (torch.zeros if nsub > 1 else torch.empty)(B, Hkv, R, max(nc_max, 1), dtype=torch.float32, device=dev)
    if nc_max > 0:
        _block_scores_kernel[(R * nsub, B * Hkv)](
            q, ck, ck2, q_pos, rows, scores, Hkv, scale * _LOG2E, dense_len, topk,
            q.stride(0), q.stride(1), q.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
            ck2.stride(0), ck2.stride(1), ck2.stride(2), scores.stride(0), scores.stride(1), scores.stride(2),
            G=G, GP=GP, BLOCK_T=bt, NSUB=nsub, BLOCK_C=tuning.get("sel_block_c", 64 if D <= 128 else 32), D=D,
            KERNEL=kernel, STRIDE=stride, KERNEL2=kernel2, STRIDE2=stride2, BS=block_size, ATOMIC=nsub > 1,
            IEEE=q.dtype == torch.float32, PIPE=bool(tuning.get("sel_pipe", False)),
            num_warps=tuning.get("sel_warps", 8 if GP * bt >= 128 else 4),
            num_stages=tuning.get("sel_stages", 3), **_launch_extra(tuning, "sel"),
        )
    width = min(nb_max, max(topk + init_blocks + local_blocks, (dense_len + row_tokens) // block_size)
                + row_tokens // block_size + 2)
    lists = torch.empty(B, Hkv, R, max(width, 1), dtype=torch.int32, device=dev)
    counts = torch.empty(B, Hkv, R, dtype=torch.int32, device=dev)
    nbp = _pow2(max(nb_max, 16))
    _block_topk_kernel[(R, B * Hkv)](
        scores, q_pos, rows, lists, counts, Hkv, topk, topk, init_blocks, local_blocks, dense_len,
        scores.stride(0), scores.stride(1), scores.stride(2), lists.stride(0), lists.stride(1), lists.stride(2),
        counts.stride(0), counts.stride(1), NBP=nbp, LOG_NBP=nbp.bit_length() - 1,
        WIDTH=(block_size + kernel - 2) // stride + 1, BS=block_size, KERNEL=kernel, STRIDE=stride,
        num_warps=8 if nbp >= 2048 else 4,
    )
    return lists, counts


def select_blocks_triton(
    q: torch.Tensor,
    ckeys: torch.Tensor,
    q_pos: torch.Tensor | None,
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
    cu_seqlens: torch.Tensor | None = None,
    max_score_elems: int = 1 << 28,
    tuning: dict | None = None,
) -> Selection:
    """Block selection (see the module docstring). Returns a `Selection` for `block_sparse_attention_triton`.
    `coarse_keys`: cached K2 (B, Hkv, N2, D) for `coarse=True` (derived from `ckeys` when None).
    `cu_seqlens`: packed documents (B == 1, block mode; q_pos is then ignored, ckeys from
    `compress_keys_triton(k, cu_seqlens=...)`); num_kv_blocks is then unused."""
    if selection not in ("token", "block"):
        raise ValueError(f"selection must be 'token' or 'block', got {selection!r}")
    tuning = tuning or {}
    B, Hq, Tq, D = q.shape
    Hkv = ckeys.shape[1]
    nb = num_kv_blocks
    device = q.device
    q = q.detach()
    if q.stride(-1) != 1:
        q = q.contiguous()
    packed = None
    if cu_seqlens is not None:
        if selection != "block":
            raise ValueError("packed documents (cu_seqlens) need selection='block' in select_blocks_triton")
        packed = _pack(cu_seqlens, Tq, select_tokens, block_size, kernel, stride, coarse_kernel, coarse_stride,
                       device)
        q_pos = packed.q_pos
    q_pos = q_pos.to(device=device, dtype=torch.int32).contiguous()
    # K1 in the query dtype for the block-mode score kernel (bf16 tensor-core products); float32 otherwise.
    ck = ckeys.detach()
    if coarse:
        if coarse_keys is None:
            coarse_keys = coarse_from_compressed(ck, kernel, stride, coarse_kernel, coarse_stride,
                                                 counts=None if packed is None else packed.counts)
        ck2 = coarse_keys.detach()
        k2, s2 = coarse_kernel, coarse_stride
    else:
        ck2, k2, s2 = ck, kernel, stride
    nc = ck.shape[2]
    opts = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                dense_len=dense_len)
    if selection == "block" and Tq > 1:  # (one query: a group of one token, the same as token mode)
        if select_tokens < 16 or select_tokens & (select_tokens - 1):
            raise ValueError(f"select_tokens must be a power of two >= 16, got {select_tokens}")
        ck = ck.to(q.dtype).contiguous()
        ck2 = ck if not coarse else ck2.to(q.dtype).contiguous()
        if packed is None:
            # Groups aligned to absolute positions (q_pos is consecutive: q_pos[0] + arange(Tq)); one host sync.
            off = int(q_pos[0]) % select_tokens
            rows = _rows_single(Tq, select_tokens, off, device)
            nb_max, nc_max = nb, nc
        else:
            rows, nb_max, nc_max = packed.rows, packed.num_blocks, packed.max_compressed
            if not coarse:  # pass 1 then reads K1: its offsets
                rows = rows.clone()
                rows[:, 5] = rows[:, 4]
        lists, counts = _select_rows(q, ck, ck2, q_pos, rows, nb_max, nc_max, scale=scale, kernel=kernel,
                                     stride=stride, kernel2=k2, stride2=s2, row_tokens=select_tokens, tuning=tuning,
                                     **opts)
        return Selection(lists, counts, None, rows, q_pos, select_tokens, nb_max, block_size,
                         key_blocks=None if packed is None else packed.key_blocks)
    ck = ck if ck.stride(-1) == 1 else ck.contiguous()
    ck2 = ck2 if ck2.stride(-1) == 1 else ck2.contiguous()
    # Per-token (exact) selection, in chunks of whole tiles so the (rows, Nc) score matrix stays bounded.
    GP, block_t = _tiles(Hq // Hkv, D)
    sel_t = max(min(block_t, _pow2(Tq)), -(-16 // GP))
    per_chunk = max(sel_t, (max_score_elems // max(1, B * Hkv * max(nc, nb))) // sel_t * sel_t)
    lists_all, counts_all, bits_all = [], [], []
    for a in range(0, Tq, per_chunk):
        e = min(Tq, a + per_chunk)
        qa, pa = q[:, :, a:e], q_pos[a:e]
        if nc > 0:
            scores = torch.empty(B, Hkv, e - a, nc, dtype=torch.float32, device=device)
            _launch_token_scores(qa, ck, ck2, pa, scores, scale=scale, kernel=kernel, stride=stride, kernel2=k2,
                                 stride2=s2)
            block_scores = _pool_blocks(scores, nb, block_size, kernel, stride)
        else:
            block_scores = torch.full((B, Hkv, e - a, nb), float("-inf"), device=device)
        mask = _choose(block_scores, pa.long(), pa.long(), **opts)
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
    rows = _rows_single(Tq, sel_t if Tq > 1 else 1, 0, device)
    return Selection(lists, counts, bits, rows, q_pos, sel_t if Tq > 1 else 1, nb, block_size)


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
    return Selection(lists.view(B, Hkv, 1, -1), counts.view(B, Hkv, 1), None, _rows_single(1, 1, 0, q.device),
                     q_pos.to(device=q.device, dtype=torch.int32).view(1), 1, num_kv_blocks, block_size)


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



def _fwd(q, k, v, sel: Selection, scale: float, tuning: dict):
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    # Default tiles: 256 query rows (a whole 64-token group of 4 heads), 16 warps, 2 stages - the fastest of the
    # configurations swept on an H100 at 128K (bench/RESULTS.md, "Sparse kernels").
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
    q_pos: torch.Tensor | None,
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
    cu_seqlens: torch.Tensor | None = None,
    tuning: dict | None = None,
) -> torch.Tensor:
    """`infllm_v2_attention` on the Triton kernels (dense SDPA while every query is short).
    `cu_seqlens`: packed documents (B == 1, queries = keys, q_pos ignored: positions restart at each document);
    block mode runs every document in the same launches, token mode once per document."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    opts = dict(block_size=block_size, kernel=kernel, stride=stride, topk=topk, init_blocks=init_blocks,
                local_blocks=local_blocks, dense_len=dense_len, selection=selection, select_tokens=select_tokens,
                coarse=coarse, coarse_kernel=coarse_kernel, coarse_stride=coarse_stride)
    Tk = k.shape[2]
    if cu_seqlens is not None:
        if q.shape[0] != 1 or q.shape[2] != Tk or ckeys is not None or coarse_keys is not None:
            raise ValueError("packed documents (cu_seqlens) need batch 1, as many queries as keys and no cached keys")
        a, L = _documents(cu_seqlens, Tk)
        all_dense = bool(((L < dense_len) | (-(-L // block_size) <= topk)).all())
        if selection == "token" and not all_dense:  # per-token selection: one document at a time
            parts = []
            for s, n in zip(a.tolist(), L.tolist()):
                if n > 0:
                    parts.append(infllm_v2_attention_triton(
                        q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n], torch.arange(n, device=q.device),
                        scale=scale, tuning=tuning, **opts))
            return torch.cat(parts, 2)
        # Block mode (or only dense documents, where both modes keep every block): all documents in one set of
        # launches through the row tables.
        ck = compress_keys_triton(k.detach(), kernel, stride, cu_seqlens)
        sel = select_blocks_triton(q, ck, None, 0, scale=scale, cu_seqlens=cu_seqlens, tuning=tuning,
                                   **dict(opts, selection="block"))
        return block_sparse_attention_triton(q, k, v, None, sel, scale=scale, tuning=tuning)
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
    sel = select_blocks_triton(q, ckeys, q_pos, num_blocks, scale=scale, coarse_keys=coarse_keys, tuning=tuning,
                               **opts)
    return block_sparse_attention_triton(q, k, v, q_pos, sel, scale=scale, tuning=tuning)
