"""Lightning attention in Triton: what the forward, backward and decode share (see lightning_triton.py): the launch
parameters (`ScanConfig` and the default configurations), the chunk-scan kernel and its host launchers, input checks.

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
    triton = tl = None  # the other kernel files take triton from here

@dataclass(frozen=True)
class ScanConfig:
    """Launch parameters of the chunk scan. `block_c`: width of the column tile one program owns (more tiles, more
    programs); `state_lowp`: with bf16 inputs, multiply a bf16 copy of the carried state (faster) instead of the
    float32 state in tf32; `target_programs`: split each sequence into segments until about this many programs run (a first pass then
    sums each segment's keys and values into a state, and every segment starts from the sum of those before it);
    `min_segment_chunks`: never cut segments shorter than this many chunks. The one-launch forwards (`lookback`,
    `overlap`) cut segments of `segment_tokens`, shorter ones only where those leave fewer than `target_programs`
    walks. Forward only: `lookback` runs the one-kernel forward (decoupled look-back across segments of `segment_tokens` tokens; k and v of a segment are read
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


# The fastest of a sweep on one H100 (bench/bench_lightning.py --sweep, bf16, 32 heads, d = 128; bench/results/kernels-lightning.md):
# forward at 64K tokens, and the three backward scans at 16K behind that forward.
# bf16 forward: the overlap forward with 64-column tiles, 4 warps (two programs per SM), 4096-token segments and the
# v-side decay, the fastest of run D's sweep (2026-11-26, H100): forward 0.149 / 0.343 / 1.32 / 5.40 ms at
# 4K / 16K / 64K / 256K against the look-back forward's 0.165 / 0.373 / 1.45 / 5.66, and faster forward + backward at
# every length too. Packed documents (cu_seqlens) take the two-pass forward with the same target_programs.
# target_programs 256: shorter segments only where 4096-token ones leave fewer walks (a small model's training batch,
# 2 x 8K tokens and 9 heads: 18), not at the shapes of the sweep (32 heads: 64 walks per 4096 tokens, 2 column tiles).
DEFAULT_CONFIG = ScanConfig(block_c=64, num_warps=4, num_stages=2, state_lowp=True, target_programs=256,
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
