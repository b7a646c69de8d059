"""Lightning attention speed on one GPU: our Triton kernels vs fla 0.6.0 and SDPA, in one run on one card.

    python bench/bench_lightning.py [--lengths 4096 16384 65536 262144] [--sweep [--sweep-seconds 120]] [--json F]

Shapes (issue 5): bf16, B=1, 32 heads, head dim 128; fwd and fwd+bwd at each length; decode step (one token) at batch
1, 8, 64. The same per-head decay goes to every implementation: fla gets it as `g_gamma` of `chunk_simple_gla`
(`chunk_lightning_attn` would impose its own layer-dependent slopes) and of `fused_recurrent_simple_gla` for decode.
Each implementation gets inputs in its native layout: ours (B, H, T, D), fla and its recurrent step (B, T, H, D).
Times: `triton.testing.do_bench` medians. Memory floor: bytes that must move (each input read once, each output
written once) over the device-to-device copy bandwidth measured at the start of the run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from hybridize.kernels import lightning_triton as LT

H, D = 32, 128
DTYPE = torch.bfloat16


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(2 * 1024 ** 3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def sala_log_decay(h: int, device="cuda") -> torch.Tensor:
    return -(2.0 ** (-8.0 * (torch.arange(h, device=device, dtype=torch.float32) + 1) / h))


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def med(fn, ms_budget=200) -> float:
    return do_bench(fn, warmup=25, rep=ms_budget, return_mode="median")


def fla_ops():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError as err:  # the run still gives our numbers
        print(f"fla not importable: {err}")
        return None, None
    return chunk_simple_gla, fused_recurrent_simple_gla


def ours_fn(q, k, v, ld, config=None, bwd_config=None):
    return lambda: LT.lightning_attn_chunked_triton(q, k, v, ld, config=config, bwd_config=bwd_config)[0]


def fwd_bwd(fwd, leaves, do):
    def run():
        fwd().backward(do)
    return run, leaves


def bench_lengths(lengths, bw, fla_chunk, rows, sdpa_max, config=None, bwd_config=None):
    ld = sala_log_decay(H)
    for T in lengths:
        torch.cuda.empty_cache()
        B = 1
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=DTYPE).requires_grad_() for _ in range(3))
        do = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE)
        ours = ours_fn(q, k, v, ld, config, bwd_config)
        io_fwd = 4 * B * H * T * D * 2  # q, k, v in; o out
        io_bwd = io_fwd + 7 * B * H * T * D * 2  # + q, k, v, do in; dq, dk, dv out
        row = dict(T=T, floor_fwd_ms=io_fwd / bw * 1e3, floor_fwdbwd_ms=io_bwd / bw * 1e3)
        with torch.no_grad():
            row["ours_fwd_ms"] = med(ours)
        run = lambda: ours().backward(do)  # noqa: E731
        row["ours_fwdbwd_ms"] = do_bench(run, warmup=25, rep=200, grad_to_none=[q, k, v], return_mode="median")
        q.grad = k.grad = v.grad = None
        if fla_chunk is not None:
            qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            dof = do.transpose(1, 2).contiguous()
            fla = lambda: fla_chunk(qf, kf, vf, g_gamma=ld, scale=D ** -0.5)[0]  # noqa: E731
            with torch.no_grad():
                o_fla = fla().transpose(1, 2)
                o_ours = ours()
                row["ours_vs_fla_rel"] = rel(o_ours, o_fla)
                del o_fla, o_ours
                row["fla_fwd_ms"] = med(fla)
            run = lambda: fla().backward(dof)  # noqa: E731
            row["fla_fwdbwd_ms"] = do_bench(run, warmup=25, rep=200, grad_to_none=[qf, kf, vf], return_mode="median")
            qf.grad = kf.grad = vf.grad = None
            del qf, kf, vf, dof
        if T <= sdpa_max:
            sd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            with torch.no_grad():
                row["sdpa_fwd_ms"] = med(sd)
            run = lambda: sd().backward(do)  # noqa: E731
            row["sdpa_fwdbwd_ms"] = do_bench(run, warmup=5, rep=100, grad_to_none=[q, k, v], return_mode="median")
        row["ours_fwd_GBs"] = io_fwd / row["ours_fwd_ms"] * 1e-6
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, do


def bench_decode(batches, bw, fla_rec, rows):
    ld = sala_log_decay(H)
    for B in batches:
        state_bytes = B * H * D * D * 4
        n_sets = max(1, math.ceil(3 * 60e6 / state_bytes))  # rotate buffers so the states do not sit in L2
        states = [torch.randn(B, H, D, D, device="cuda") for _ in range(n_sets)]
        q, k, v = (torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE) for _ in range(3))
        it = itertools.cycle(range(n_sets))
        row = dict(batch=B, floor_ms=2 * state_bytes / bw * 1e3)
        with torch.no_grad():
            row["ours_ms"] = med(lambda: LT.lightning_attn_step_triton(q, k, v, ld, states[next(it)]))
            if fla_rec is not None:
                qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))
                s_check = torch.randn(B, H, D, D, device="cuda")
                o_f, s_f = fla_rec(qf, kf, vf, g_gamma=ld, scale=D ** -0.5, initial_state=s_check.clone(),
                                   output_final_state=True)
                o_o = LT.lightning_attn_step_triton(q, k, v, ld, s_check)
                row["ours_vs_fla_rel"] = max(rel(o_o, o_f.transpose(1, 2)), rel(s_check, s_f))
                row["fla_ms"] = med(lambda: fla_rec(qf, kf, vf, g_gamma=ld, scale=D ** -0.5,
                                                    initial_state=states[next(it)], output_final_state=True))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del states


FWD_GRID = [  # (block_c, num_warps, num_stages, state_lowp), most promising first: the sweep stops at its time budget
    (64, 8, 3, True), (32, 8, 3, True), (64, 4, 3, False), (32, 4, 3, False), (64, 8, 3, False), (32, 4, 3, True),
    (64, 4, 3, True), (32, 8, 3, False), (64, 8, 2, True), (32, 4, 2, False), (128, 8, 3, True), (64, 4, 2, False),
]
BWD_GRID = [(32, 4, 3, False), (64, 4, 3, False), (64, 8, 3, True), (32, 8, 3, True), (64, 8, 3, False),
            (32, 4, 3, True), (64, 4, 3, True), (32, 8, 3, False)]
TARGETS = (512, 1024, 2048, 4096)


def sweep(seconds: float, T_fwd: int = 65536, T_bwd: int = 16384):
    """Launch-parameter sweep within a time budget: the forward at T_fwd (each config at several segment counts),
    then the backward scans at T_bwd behind the fastest forward. Returns (rows, best fwd config, best bwd config)."""
    import time

    t0 = time.time()
    ld = sala_log_decay(H)
    results = []
    q, k, v = (torch.randn(1, H, T_fwd, D, device="cuda", dtype=DTYPE) for _ in range(3))
    best = (float("inf"), LT.DEFAULT_CONFIG)
    for bc, nw, ns, lowp in FWD_GRID:
        if time.time() - t0 > seconds * 0.55:
            break
        for target in TARGETS:
            if time.time() - t0 > seconds * 0.55:
                break
            cfg = LT.ScanConfig(block_c=bc, num_warps=nw, num_stages=ns, state_lowp=lowp, target_programs=target)
            try:
                with torch.no_grad():
                    ms = med(ours_fn(q, k, v, ld, cfg), 100)
            except Exception as exc:  # a config the compiler refuses (out of shared memory, ...)
                print(f"sweep fwd {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                break
            results.append(dict(kind="fwd", T=T_fwd, cfg=str(cfg), ms=ms))
            print(json.dumps(results[-1]), flush=True)
            best = min(best, (ms, cfg), key=lambda x: x[0])
    del q, k, v
    fwd_cfg = best[1]
    print(f"best forward: {best}", flush=True)
    q, k, v = (torch.randn(1, H, T_bwd, D, device="cuda", dtype=DTYPE).requires_grad_() for _ in range(3))
    do = torch.randn_like(q)
    best_b = (float("inf"), LT.DEFAULT_BWD_CONFIG)
    for bc, nw, ns, lowp in BWD_GRID:
        if time.time() - t0 > seconds:
            break
        cfg = LT.ScanConfig(block_c=bc, num_warps=nw, num_stages=ns, state_lowp=lowp)
        fn = ours_fn(q, k, v, ld, fwd_cfg, cfg)
        try:
            ms = do_bench(lambda: fn().backward(do), warmup=10, rep=100, grad_to_none=[q, k, v],
                          return_mode="median")
        except Exception as exc:
            print(f"sweep bwd {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        results.append(dict(kind="fwdbwd", T=T_bwd, fwd_cfg=str(fwd_cfg), cfg=str(cfg), ms=ms))
        print(json.dumps(results[-1]), flush=True)
        best_b = min(best_b, (ms, cfg), key=lambda x: x[0])
    print(f"best backward: {best_b}", flush=True)
    return results, fwd_cfg, best_b[1]


def check_against_reference(config, bwd_config, T=4096):
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
    print(f"check vs reference (T={T}, bf16): {'ok' if ok else 'FAIL'} {errs}", flush=True)
    return dict(kind="check", ok=ok, **errs)


def table(rows, bw) -> str:
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", "",
             "| T | ours fwd ms | fla fwd ms | fwd ratio | ours fwd+bwd ms | fla fwd+bwd ms | fwd+bwd ratio | "
             "SDPA fwd / fwd+bwd ms | fwd floor ms | ours fwd / floor | ours fwd GB/s | rel(ours, fla) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    for r in rows:
        if "T" not in r or "kind" in r or "ours_fwd_ms" not in r:
            continue
        fla_f, fla_b = r.get("fla_fwd_ms"), r.get("fla_fwdbwd_ms")
        lines.append(
            f"| {r['T']} | {f(r['ours_fwd_ms'])} | {f(fla_f)} | {f(fla_f and r['ours_fwd_ms'] / fla_f)} | "
            f"{f(r['ours_fwdbwd_ms'])} | {f(fla_b)} | {f(fla_b and r['ours_fwdbwd_ms'] / fla_b)} | "
            f"{f(r.get('sdpa_fwd_ms'))} / {f(r.get('sdpa_fwdbwd_ms'))} | {f(r['floor_fwd_ms'])} | "
            f"{f(r['ours_fwd_ms'] / r['floor_fwd_ms'])} | {r['ours_fwd_GBs']:.0f} | {f(r.get('ours_vs_fla_rel'))} |")
    lines += ["", "| decode batch | ours ms | fla fused_recurrent ms | fla / ours | floor ms | ours GB/s | rel(ours, fla) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "batch" not in r or "ours_ms" not in r:
            continue
        gbs = 2 * r["batch"] * H * D * D * 4 / r["ours_ms"] * 1e-6
        fla_ms = r.get("fla_ms")
        lines.append(f"| {r['batch']} | {f(r['ours_ms'])} | {f(fla_ms)} | {f(fla_ms and fla_ms / r['ours_ms'])} | "
                     f"{f(r['floor_ms'])} | {gbs:.0f} | {f(r.get('ours_vs_fla_rel'))} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384, 65536, 262144])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--sdpa-max", type=int, default=65536, help="longest T timed with SDPA (it is quadratic)")
    ap.add_argument("--sweep", action="store_true",
                    help="first sweep launch parameters (fwd at 64K, fwd+bwd at 16K) and time the fastest")
    ap.add_argument("--sweep-seconds", type=float, default=120.0, help="time budget of the sweep")
    ap.add_argument("--json", default=None, help="write all rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA device")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    bw = copy_bandwidth()
    fla_chunk, fla_rec = fla_ops()
    rows: list[dict] = []
    config, bwd_config = LT.DEFAULT_CONFIG, LT.DEFAULT_BWD_CONFIG
    if args.sweep:
        found, config, bwd_config = sweep(args.sweep_seconds)
        rows += found
    print(f"forward config {config}\nbackward config {bwd_config}", flush=True)
    rows.append(check_against_reference(config, bwd_config))
    if args.batches:
        bench_decode(args.batches, bw, fla_rec, rows)
    bench_lengths(args.lengths, bw, fla_chunk, rows, args.sdpa_max, config, bwd_config)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=bw, config=str(config),
                           bwd_config=str(bwd_config), rows=rows), fh, indent=1)
    if args.sweep:
        for kind in ("fwd", "fwdbwd"):
            best = sorted((r for r in rows if r.get("kind") == kind), key=lambda r: r["ms"])[:3]
            print(f"sweep {kind}, fastest:", *(f"  {r['ms']:.3f} ms {r['cfg']}" for r in best), sep="\n")
    print(f"forward config {config}\nbackward config {bwd_config}")
    print(table(rows, bw))

if __name__ == "__main__":
    main()
