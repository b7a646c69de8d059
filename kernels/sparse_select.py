"""InfLLM-V2 sparse Triton kernels, stage 2: block selection (token and block modes, see sparse_triton.py), the
row tables of packed documents and the `Selection` the attention kernels read. The block-choice rule is the
reference's `_choose` (sparse_reference.py), with a faster top-k of the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sparse_common import (_LOG2E, HAS_TRITON, _coarse_count, _count, _documents, _host_to_device, _launch_extra,
                            _positions_to_device, _pow2, _tiles, tl, triton)
from .sparse_compress import coarse_from_compressed
from .sparse_reference import SparseOptions, _choose

if HAS_TRITON:
    from .sparse_common import _dot, _lse_step

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
    return _Packed(_host_to_device(rows, device), _host_to_device(kbt, device), _host_to_device(q_pos, device),
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
        """For each (b, g, global key block), the rows that read it: (offsets, rows), CSR. Fixed sizes, so no host
        sync: unused list slots sort last under a key past every block and sit past the last offset, unread."""
        if self._reverse is None:
            B, H, R, W = self.lists.shape
            dev = self.lists.device
            valid = torch.arange(W, device=dev) < self.counts.unsqueeze(-1)
            bg = torch.arange(B * H, device=dev).view(B, H, 1, 1)
            keys = bg * nbt + self.rows[:, 3].long().view(1, 1, R, 1) + self.lists.long()
            keys = torch.where(valid, keys, B * H * nbt).view(-1)
            order = torch.argsort(keys, stable=True)
            off = torch.searchsorted(keys[order], torch.arange(B * H * nbt + 1, device=dev))
            rows = torch.arange(R, device=dev, dtype=torch.int32).view(1, 1, R, 1).expand(B, H, R, W).reshape(-1)
            self._reverse = (off, rows[order].contiguous())
        return self._reverse


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


def _select_rows(q, ck, ck2, q_pos, rows, nb_max, nc_max, *, scale, options: SparseOptions, kernel2, stride2,
                 tuning):
    """Block mode selection over a row table (rows of `options.select_tokens` queries): two launches (group scores,
    then pool + top-k). -> lists, counts."""
    o = options
    block_size, kernel, stride, topk = o.block_size, o.kernel, o.stride, o.topk
    init_blocks, local_blocks, dense_len, row_tokens = o.init_blocks, o.local_blocks, o.dense_len, o.select_tokens
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
    options: SparseOptions | None = None,
    coarse_keys: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_score_elems: int = 1 << 28,
    tuning: dict | None = None,
    **fields,
) -> Selection:
    """Block selection (see the module docstring). Returns a `Selection` for `block_sparse_attention_triton`.
    `coarse_keys`: cached K2 (B, Hkv, N2, D) for `coarse=True` (derived from `ckeys` when None).
    `cu_seqlens`: packed documents (B == 1, block mode; q_pos is then ignored, ckeys from
    `compress_keys_triton(k, cu_seqlens=...)`); num_kv_blocks is then unused. `options` / `fields`: SparseOptions."""
    o = SparseOptions.of(options, **fields)
    if o.selection not in ("token", "block"):
        raise ValueError(f"selection must be 'token' or 'block', got {o.selection!r}")
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
        if o.selection != "block":
            raise ValueError("packed documents (cu_seqlens) need selection='block' in select_blocks_triton")
        packed = _pack(cu_seqlens, Tq, o.select_tokens, o.block_size, o.kernel, o.stride, o.coarse_kernel,
                       o.coarse_stride, device)
        q_pos = packed.q_pos
    # where the caller built q_pos on the host (training and prefill: 0..T-1), its first position costs no sync
    first = int(q_pos[0]) if packed is None and q_pos.device.type == "cpu" and q_pos.numel() else None
    q_pos = _positions_to_device(q_pos, device)
    # K1 in the query dtype for the block-mode score kernel (bf16 tensor-core products); float32 otherwise.
    ck = ckeys.detach()
    if o.coarse:
        if coarse_keys is None:
            coarse_keys = coarse_from_compressed(ck, o.kernel, o.stride, o.coarse_kernel, o.coarse_stride,
                                                 counts=None if packed is None else packed.counts)
        ck2 = coarse_keys.detach()
        k2, s2 = o.coarse_kernel, o.coarse_stride
    else:
        ck2, k2, s2 = ck, o.kernel, o.stride
    nc = ck.shape[2]
    if o.selection == "block" and Tq > 1:  # (one query: a group of one token, the same as token mode)
        if o.select_tokens < 16 or o.select_tokens & (o.select_tokens - 1):
            raise ValueError(f"select_tokens must be a power of two >= 16, got {o.select_tokens}")
        ck = ck.to(q.dtype).contiguous()
        ck2 = ck if not o.coarse else ck2.to(q.dtype).contiguous()
        if packed is None:
            # Groups aligned to absolute positions (q_pos is consecutive: q_pos[0] + arange(Tq)); one host sync
            # unless q_pos came from the host.
            off = (first if first is not None else int(q_pos[0])) % o.select_tokens
            rows = _rows_single(Tq, o.select_tokens, off, device)
            nb_max, nc_max = nb, nc
        else:
            rows, nb_max, nc_max = packed.rows, packed.num_blocks, packed.max_compressed
            if not o.coarse:  # pass 1 then reads K1: its offsets
                rows = rows.clone()
                rows[:, 5] = rows[:, 4]
        lists, counts = _select_rows(q, ck, ck2, q_pos, rows, nb_max, nc_max, scale=scale, options=o, kernel2=k2,
                                     stride2=s2, tuning=tuning)
        return Selection(lists, counts, None, rows, q_pos, o.select_tokens, nb_max, o.block_size,
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
            _launch_token_scores(qa, ck, ck2, pa, scores, scale=scale, kernel=o.kernel, stride=o.stride,
                                 kernel2=k2, stride2=s2)
            block_scores = _pool_blocks(scores, nb, o.block_size, o.kernel, o.stride)
        else:
            block_scores = torch.full((B, Hkv, e - a, nb), float("-inf"), device=device)
        mask = _choose(block_scores, pa.long(), pa.long(), o, top=_top_later_wins)
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
    return Selection(lists, counts, bits, rows, q_pos, sel_t if Tq > 1 else 1, nb, o.block_size)
