"""Lightning attention speed on one GPU: our Triton kernels vs fla 0.6.0 and SDPA, in one run on one card.

    python bench/bench_lightning.py [--lengths 4096 16384 65536 262144] [--batches 1 8 64] [--budget 400]
                                    [--sweep [--sweep-seconds 60]] [--skip decode norm_gate bthd] [--json F]
                                    [--variants look-back default two-pass]

Shapes (issue 5): bf16, B=1, 32 heads, head dim 128; fwd and fwd+bwd at each length; decode step (one token) at batch
1, 8, 64, timed eager and as a CUDA-graph replay (the graph measures the kernels, eager also the launch path). The
same per-head decay goes to every implementation: fla gets it as `g_gamma` of `chunk_simple_gla` (`chunk_lightning_attn`
would impose its own layer-dependent slopes) and of `fused_recurrent_simple_gla` for decode. Each implementation gets
inputs in its native layout: ours (B, H, T, D), fla (B, T, H, D). Times: `triton.testing.do_bench` medians. Memory
floor: bytes that must move (each input read once, each output written once) over the device-to-device copy bandwidth
measured at the start of the run.

Forward variants timed side by side at every length (fwd and fwd+bwd): "look-back" (the bf16 default of run C,
`LT.LOOKBACK_CONFIG`), "default" (`LT.DEFAULT_CONFIG`: the overlap forward since run D), "two-pass" (segment sums,
then the walks) and, with `--sweep`, "new": the fastest other forward of the sweep at 64K (see SWEEP), plus
"overlap", the fastest overlap forward, where that is not "new"; each is checked against the PyTorch reference first.

Order, so that a run cut short still has its main table: (sweep), reference checks, 4K / 16K / 64K (fla is called
once untimed at each shape first: it compiles and autotunes there), decode, then 256K. The table so far is printed
after every row; everything after `--budget` seconds is skipped (and said so).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from hybridize.kernels import lightning_triton as LT

H, D = 32, 128
DTYPE = torch.bfloat16
T0 = time.time()


def elapsed() -> float:
    return time.time() - T0


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(2 * 1024 ** 3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * 2 * 1024 ** 3 / (ms * 1e-3)


def sala_log_decay(h: int, device="cuda") -> torch.Tensor:
    return -(2.0 ** (-8.0 * (torch.arange(h, device=device, dtype=torch.float32) + 1) / h))


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def med(fn, rep=100, warmup=10, grad_to_none=None) -> float:
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def fla_ops():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError as err:  # the run still gives our numbers
        print(f"fla not importable: {err}")
        return None, None
    return chunk_simple_gla, fused_recurrent_simple_gla


def ours_fn(q, k, v, ld, config=None, bwd_config=None):
    return lambda: LT.lightning_attn_chunked_triton(q, k, v, ld, config=config, bwd_config=bwd_config)[0]


# the two-pass forward: segment sums, then the segments' walks
TWO_PASS = LT.ScanConfig(block_c=128, num_warps=8, num_stages=3, state_lowp=True, target_programs=512, lookback=False)


def bench_length(T, bw, fla_chunk, sdpa_max, variants, bwd_config, bthd=True) -> dict:
    """fwd and fwd+bwd at T for each named forward config in `variants` (the first is "ours"), fla and SDPA."""
    ld = sala_log_decay(H)
    torch.cuda.empty_cache()
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=DTYPE).requires_grad_() for _ in range(3))
    do = torch.randn(1, H, T, D, device="cuda", dtype=DTYPE)
    io_fwd = 4 * H * T * D * 2  # q, k, v in; o out
    io_bwd = io_fwd + 7 * H * T * D * 2  # + q, k, v, do in; dq, dk, dv out
    row = dict(T=T, floor_fwd_ms=io_fwd / bw * 1e3, floor_fwdbwd_ms=io_bwd / bw * 1e3)
    first = next(iter(variants))
    for name, cfg in variants.items():
        fn = ours_fn(q, k, v, ld, cfg, bwd_config)
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = med(fn)
        row[f"{name}_fwdbwd_ms"] = med(lambda: fn().backward(do), grad_to_none=[q, k, v])
    row["ours_fwd_ms"], row["ours_fwdbwd_ms"] = row[f"{first}_fwd_ms"], row[f"{first}_fwdbwd_ms"]
    row["ours_fwd_GBs"] = io_fwd / row["ours_fwd_ms"] * 1e-6
    if bthd:
        with torch.no_grad():
            # the model's layout: (B, T, H, D) projections viewed as (B, H, T, D); o comes back in that order
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
            row["ours_bthd_fwd_ms"] = med(ours_fn(qt, kt, vt, ld, variants[first]))
            del qt, kt, vt
    print(f"[{elapsed():.0f}s] T={T} ours done", flush=True)
    if fla_chunk is not None:
        qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        dof = do.transpose(1, 2).contiguous()
        fla = lambda: fla_chunk(qf, kf, vf, g_gamma=ld, scale=D ** -0.5)[0]  # noqa: E731
        t1 = time.time()
        fla().backward(dof)  # untimed: compiles and autotunes at this shape
        torch.cuda.synchronize()
        row["fla_first_call_s"] = time.time() - t1
        with torch.no_grad():
            row["ours_vs_fla_rel"] = rel(ours_fn(q, k, v, ld, variants[first])(), fla().transpose(1, 2))
            row["fla_fwd_ms"] = med(fla)
        row["fla_fwdbwd_ms"] = med(lambda: fla().backward(dof), grad_to_none=[qf, kf, vf])
        del qf, kf, vf, dof
        print(f"[{elapsed():.0f}s] T={T} fla done", flush=True)
    if T <= sdpa_max:
        sd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        with torch.no_grad():
            row["sdpa_fwd_ms"] = med(sd, rep=50, warmup=2)
        row["sdpa_fwdbwd_ms"] = med(lambda: sd().backward(do), rep=50, warmup=1, grad_to_none=[q, k, v])
    del q, k, v, do
    return row


def graph_ms(steps) -> float:
    """Per-step time of a CUDA graph that replays `steps` (each one call) back to back."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in steps:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in steps:
            f()
    return med(g.replay, rep=100) / len(steps)


def bench_decode(B, bw, fla_rec) -> dict:
    ld = sala_log_decay(H)
    state_bytes = B * H * D * D * 4
    n_sets = max(4, math.ceil(3 * 60e6 / state_bytes))  # rotate states so that they do not sit in L2
    states = [torch.randn(B, H, D, D, device="cuda") for _ in range(n_sets)]
    q, k, v = (torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE) for _ in range(3))
    row = dict(batch=B, floor_ms=2 * state_bytes / bw * 1e3)
    ours_steps = [lambda s=s: LT.lightning_attn_step_triton(q, k, v, ld, s) for s in states]
    with torch.no_grad():
        it = iter(range(10 ** 9))
        row["ours_ms"] = med(lambda: ours_steps[next(it) % n_sets]())
        row["ours_graph_ms"] = graph_ms(ours_steps)
        if fla_rec is not None:
            qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            s_check = torch.randn(B, H, D, D, device="cuda")
            o_f, s_f = fla_rec(qf, kf, vf, g_gamma=ld, scale=D ** -0.5, initial_state=s_check.clone(),
                               output_final_state=True)
            o_o = LT.lightning_attn_step_triton(q, k, v, ld, s_check)
            row["ours_vs_fla_rel"] = max(rel(o_o, o_f.transpose(1, 2)), rel(s_check, s_f))
            fla_steps = [lambda s=s: fla_rec(qf, kf, vf, g_gamma=ld, scale=D ** -0.5, initial_state=s,
                                             output_final_state=True) for s in states]
            row["fla_ms"] = med(lambda: fla_steps[next(it) % n_sets]())
            try:
                row["fla_graph_ms"] = graph_ms(fla_steps)
            except Exception as exc:  # noqa: BLE001 - reported, the row still has the eager numbers
                print(f"fla decode in a CUDA graph failed: {type(exc).__name__}: {str(exc)[:200]}")
    del states
    return row


def bench_norm_gate(T, bw) -> dict:
    """The layer's output RMSNorm over H*d + sigmoid gate: fused kernel vs the model's PyTorch composition."""
    from hybridize.kernels.norm_gate_triton import rmsnorm_gate_reference, rmsnorm_gate_triton

    N = H * D
    o, z = (torch.randn(1, T, N, device="cuda", dtype=DTYPE).requires_grad_() for _ in range(2))
    w = torch.ones(N, device="cuda", dtype=DTYPE).requires_grad_()
    dy = torch.randn(1, T, N, device="cuda", dtype=DTYPE)
    row = dict(norm_gate_T=T, floor_fwd_ms=3 * T * N * 2 / bw * 1e3)
    for name, fn in (("fused", rmsnorm_gate_triton), ("torch", rmsnorm_gate_reference)):
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = med(lambda: fn(o, z, w, 1e-6))
        row[f"{name}_fwdbwd_ms"] = med(lambda: fn(o, z, w, 1e-6).backward(dy), grad_to_none=[o, z, w])
    with torch.no_grad():
        row["rel"] = rel(rmsnorm_gate_triton(o, z, w, 1e-6), rmsnorm_gate_reference(o, z, w, 1e-6))
    return row


def short(cfg) -> str:
    """A config by the fields that differ from ScanConfig's defaults."""
    base = LT.ScanConfig()
    diff = {k: v for k, v in vars(cfg).items() if getattr(base, k) != v}
    return "ScanConfig(" + ", ".join(f"{k}={v}" for k, v in diff.items()) + ")"


def _c(block_c, num_warps, num_stages, target_programs=512, lookback=False, segment_tokens=512, inter_first=False,
       **more):
    return LT.ScanConfig(block_c=block_c, num_warps=num_warps, num_stages=num_stages, state_lowp=True,
                         target_programs=target_programs, lookback=lookback, segment_tokens=segment_tokens,
                         inter_first=inter_first, **more)


def _ov(block_c, num_warps, num_stages, segment_tokens, lead=1, decay_v=False, **more):
    """The overlap forward: sum and walk programs from one ticket counter, sums `lead` segments ahead."""
    return _c(block_c, num_warps, num_stages, segment_tokens=segment_tokens, overlap=True, lead=lead, decay_v=decay_v,
              **more)


SWEEP = [  # forward configs at 64K: the look-back, two-pass and default first, then the most promising (the sweep stops
    # at its budget)
    LT.LOOKBACK_CONFIG, TWO_PASS, LT.DEFAULT_CONFIG,
    # Nsight Compute on the default at 64K (results/kernels-lightning.md): 3.25 GB of DRAM traffic against the 2.15 GB floor, L2 hit
    # rate 34.5%; the two 64-column tiles of a segment both read its q and k, and the walks load them evict-first
    _ov(64, 4, 2, 4096, decay_v=True, walk_qk_hint=""), _ov(64, 4, 2, 4096, decay_v=True, walk_qk_hint="evict_last"),
    _ov(64, 4, 2, 8192, decay_v=True, walk_qk_hint="evict_last"),
    # around run D's winner (64 columns, 4 warps, 4096-token segments, decay_v): fewer and longer walks, narrower
    # column tiles (more walk programs per SM, q and k re-read from L2), deeper pipelines (not yet timed)
    _ov(64, 4, 2, 8192, decay_v=True), _ov(64, 4, 2, 16384, decay_v=True), _ov(32, 4, 2, 4096, decay_v=True),
    _ov(32, 2, 2, 4096, decay_v=True), _ov(32, 4, 2, 8192, decay_v=True), _ov(64, 4, 3, 4096, decay_v=True),
    _ov(64, 4, 2, 4096, decay_v=True, sum_stages=4), _ov(64, 4, 2, 4096, lead=2, decay_v=True),
    # 128-token chunks: half the walk iterations, each with twice the work (more independent products in flight)
    _ov(64, 4, 2, 4096, decay_v=True, chunk=128), _ov(64, 8, 2, 4096, decay_v=True, chunk=128),
    # run D's sweep: overlap forward, 4 warps and 64 columns: a sum and a walk program fit on one SM together
    _ov(64, 4, 2, 1024, decay_v=True), _ov(64, 4, 2, 1024, decay_v=True, sum_stages=4),
    _ov(64, 4, 2, 512, decay_v=True), _ov(64, 4, 2, 2048, decay_v=True), _ov(64, 4, 2, 512, decay_v=True, sum_stages=4),
    _ov(128, 8, 3, 1024),  # one program per SM: sums and walks take turns
    _ov(64, 4, 2, 1024, lead=2, decay_v=True), _ov(64, 4, 2, 256, decay_v=True), _ov(64, 4, 2, 1024),
    _ov(64, 4, 2, 1024, lead=0, decay_v=True), _ov(128, 8, 3, 512),
    _ov(64, 4, 2, 1024, lead=10 ** 6, decay_v=True),  # every sum before any walk: the overlap switched off
    _c(64, 4, 2, 1024, inter_first=True), _c(128, 8, 3, inter_first=True),
    _ov(64, 4, 2, 1024, decay_v=True, l2_hints=False), _ov(128, 8, 3, 2048),
]


def sweep(seconds: float, T: int = 65536):
    """Forward (no grad) at T for the configs in SWEEP within a time budget, each output compared with the first's,
    and the two-pass forward's time split into its two passes. Returns (rows, {"new": the fastest config other than
    the two shipped ones, "overlap": the fastest overlap forward if that is another one})."""
    t0 = time.time()
    ld = sala_log_decay(H)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=DTYPE) for _ in range(3))
    rows = []
    with torch.no_grad():
        # where the two-pass forward's time goes: the segment sums (k, v read) and the main walk (q, k, v, o)
        nseg, segc = LT._segments(T, 64, H, TWO_PASS, False)
        sums = lambda: LT._segment_sums(k, v, ld, reverse=False, scale_state=1.0, nseg=nseg, segc=segc,  # noqa: E731
                                        chunk=64, config=TWO_PASS)
        u = sums()
        walk = lambda: LT._scan(q, k, v, ld, init=None, init_transposed=False, reverse=False,  # noqa: E731
                                scale_out=D ** -0.5, scale_state=1.0, store_final=False, cu_seqlens=None, chunk=64,
                                out_dtype=q.dtype, config=TWO_PASS, nseg=nseg, segc=segc, u=u)
        split = dict(kind="two_pass_split", T=T, nseg=nseg, sums_ms=med(sums), walk_ms=med(walk))
        split["sums_GBs"] = 2 * H * T * D * 2 / split["sums_ms"] * 1e-6
        split["walk_GBs"] = 4 * H * T * D * 2 / split["walk_ms"] * 1e-6
        rows.append(split)
        print(json.dumps(split), flush=True)
        del u
        ref = ours_fn(q, k, v, ld, SWEEP[0])()
        best, best_ov = (float("inf"), None), (float("inf"), None)
        for cfg in SWEEP:
            if time.time() - t0 > seconds:
                print("sweep: time budget spent")
                break
            fn = ours_fn(q, k, v, ld, cfg)
            try:
                err = rel(fn(), ref)
                ms = med(fn)
            except Exception as exc:  # noqa: BLE001 - a config the compiler refuses (out of shared memory, ...)
                print(f"sweep {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            rows.append(dict(kind="sweep", T=T, cfg=str(cfg), short=short(cfg), ms=ms, rel=err))
            print(f"[{elapsed():.0f}s] sweep {ms:.3f} ms rel {err:.1e} {short(cfg)}", flush=True)
            if err < 2e-2 and cfg not in (LT.LOOKBACK_CONFIG, LT.DEFAULT_CONFIG, TWO_PASS):
                best = min(best, (ms, cfg), key=lambda x: x[0])
                if cfg.overlap:
                    best_ov = min(best_ov, (ms, cfg), key=lambda x: x[0])
    del q, k, v
    found = {"new": best[1]}
    if best_ov[1] is not None and best_ov[1] != best[1]:
        found["overlap"] = best_ov[1]
    return rows, {n: c for n, c in found.items() if c is not None}


def check_against_reference(config, bwd_config, T=4096, name="ours"):
    """The configs the table uses, against the PyTorch reference (float32 upcast), forward and gradients."""
    from hybridize.kernels.lightning_reference import lightning_attn_chunked

    ld = sala_log_decay(H)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=DTYPE).requires_grad_() for _ in range(3))
    s0 = torch.randn(1, H, D, D, device="cuda").requires_grad_()
    do = torch.randn(1, H, T, D, device="cuda", dtype=DTYPE)
    leaves = [q, k, v, s0]
    o, _ = LT.lightning_attn_chunked_triton(q, k, v, ld, initial_state=s0, config=config, bwd_config=bwd_config)
    g = torch.autograd.grad(o, leaves, do)
    o_r, _ = lightning_attn_chunked(q, k, v, ld, initial_state=s0)
    g_r = torch.autograd.grad(o_r, leaves, do)
    errs = {n: rel(a, b) for n, a, b in zip(["o", "dq", "dk", "dv", "ds0"], [o, *g], [o_r, *g_r])}
    ok = all(math.isfinite(e) and e < 1e-2 for e in errs.values())
    print(f"check {name} vs reference (T={T}, bf16): {'ok' if ok else 'FAIL'} {errs}", flush=True)
    return dict(kind="check", name=name, ok=ok, **errs)


def table(rows, bw, names=("ours",)) -> str:
    f = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", "",
             "| T | " + " | ".join(f"{n} fwd ms" for n in names) + " | fla fwd ms | fwd floor ms | "
             + " | ".join(f"{n} / floor" for n in names) + " | " + " | ".join(f"{n} fwd+bwd ms" for n in names)
             + " | fla fwd+bwd ms | " + " | ".join(f"{n} fwd+bwd / fla" for n in names)
             + " | (B,T,H,D) fwd ms | SDPA fwd / fwd+bwd ms | rel(ours, fla) |",
             "|---" * (7 + 4 * len(names)) + "|"]
    for r in rows:
        if "ours_fwd_ms" not in r:
            continue
        g = r.get
        cells = [str(r["T"])] + [f(g(f"{n}_fwd_ms")) for n in names] + [f(g("fla_fwd_ms")), f(g("floor_fwd_ms"))]
        cells += [f(ratio(g(f"{n}_fwd_ms"), g("floor_fwd_ms"))) for n in names]
        cells += [f(g(f"{n}_fwdbwd_ms")) for n in names] + [f(g("fla_fwdbwd_ms"))]
        cells += [f(ratio(g(f"{n}_fwdbwd_ms"), g("fla_fwdbwd_ms"))) for n in names]
        cells += [f(g("ours_bthd_fwd_ms")), f"{f(g('sdpa_fwd_ms'))} / {f(g('sdpa_fwdbwd_ms'))}",
                  f(g("ours_vs_fla_rel"))]
        lines.append("| " + " | ".join(cells) + " |")
    if not any("ours_ms" in r for r in rows) and not any("norm_gate_T" in r for r in rows):
        return "\n".join(lines)
    lines += ["", "| decode batch | ours eager ms | fla eager ms | fla / ours eager | ours graph ms | fla graph ms | "
              "fla / ours graph | floor ms | ours graph GB/s (% of copy) | rel(ours, fla) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ours_ms" not in r:
            continue
        g = r.get
        gbs = 2 * r["batch"] * H * D * D * 4 / r["ours_graph_ms"] * 1e-6
        lines.append(
            f"| {r['batch']} | {f(g('ours_ms'))} | {f(g('fla_ms'))} | {f(ratio(g('fla_ms'), g('ours_ms')))} | "
            f"{f(g('ours_graph_ms'))} | {f(g('fla_graph_ms'))} | {f(ratio(g('fla_graph_ms'), g('ours_graph_ms')))} | "
            f"{f(g('floor_ms'))} | {gbs:.0f} ({100 * gbs * 1e9 / bw:.0f}%) | {f(g('ours_vs_fla_rel'))} |")
    lines += ["", "| output norm + gate, T (N = H*d) | fused fwd ms | torch fwd ms | fused fwd+bwd ms | torch fwd+bwd ms | "
              "fwd floor ms | rel |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "norm_gate_T" not in r:
            continue
        g = r.get
        lines.append(f"| {r['norm_gate_T']} | {f(g('fused_fwd_ms'))} | {f(g('torch_fwd_ms'))} | "
                     f"{f(g('fused_fwdbwd_ms'))} | {f(g('torch_fwdbwd_ms'))} | {f(g('floor_fwd_ms'))} | {f(g('rel'))} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384, 65536, 262144])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--sdpa-max", type=int, default=65536, help="longest T timed with SDPA (it is quadratic)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; later parts are skipped after this")
    ap.add_argument("--sweep", action="store_true", help="first sweep the forward's configurations at 64K and time "
                    "the fastest one other than the two shipped ones beside them, as 'new'")
    ap.add_argument("--sweep-seconds", type=float, default=60.0, help="time budget of the sweep")
    ap.add_argument("--skip", nargs="*", default=[], choices=["decode", "norm_gate", "bthd"],
                    help="leave out the decode rows, the norm + gate rows, the (B,T,H,D)-layout forward")
    ap.add_argument("--variants", nargs="+", default=["look-back", "default", "two-pass"],
                    choices=["look-back", "default", "two-pass"],
                    help="forward configs timed side by side (the first one is 'ours' in the ratios)")
    ap.add_argument("--json", default=None, help="write all rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA device")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    fla_chunk, fla_rec = fla_ops()
    rows: list[dict] = []
    known = {"look-back": LT.LOOKBACK_CONFIG, "default": LT.DEFAULT_CONFIG, "two-pass": TWO_PASS}
    variants = {n: known[n] for n in dict.fromkeys(args.variants)}
    bwd_config = LT.DEFAULT_BWD_CONFIG
    if args.sweep:
        found, new = sweep(args.sweep_seconds)
        rows += found
        variants.update(new)
    names = tuple(variants)
    for name, cfg in variants.items():
        print(f"{name}: forward config {cfg}", flush=True)
        rows.append(check_against_reference(cfg, bwd_config, name=name))
    print(f"backward config {bwd_config}", flush=True)
    long = [T for T in args.lengths if T > 65536]
    plan = [("T", T) for T in args.lengths if T <= 65536]
    plan += [("B", B) for B in args.batches if "decode" not in args.skip]
    plan += [("N", T) for T in (16384, 65536) if "norm_gate" not in args.skip] + [("T", T) for T in long]

    def dump():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=bw,
                               variants={n: str(c) for n, c in variants.items()}, bwd_config=str(bwd_config),
                               rows=rows), fh, indent=1)

    for kind, n in plan:
        if elapsed() > args.budget:
            print(f"skipped ({kind}={n}): past the {args.budget:.0f} s budget", flush=True)
            continue
        try:
            if kind == "T":
                row = bench_length(n, bw, fla_chunk, args.sdpa_max, variants, bwd_config, "bthd" not in args.skip)
            elif kind == "B":
                row = bench_decode(n, bw, fla_rec)
            else:
                row = bench_norm_gate(n, bw)
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{kind}={n}: out of memory: {str(exc)[:200]}", flush=True)
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
        print(table(rows, bw, names), flush=True)
        dump()
    if args.sweep:
        best = sorted((r for r in rows if r.get("kind") == "sweep"), key=lambda r: r["ms"])[:5]
        print("sweep, fastest:", *(f"  {r['ms']:.3f} ms rel {r['rel']:.1e} {r['short']}" for r in best), sep="\n")
    print(f"[{elapsed():.0f}s] " + "\n".join(f"{n}: {short(c)}" for n, c in variants.items())
          + f"\nbackward config {short(bwd_config)}")
    print(table(rows, bw, names))
    dump()


if __name__ == "__main__":
    main()
