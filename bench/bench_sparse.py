"""InfLLM-V2 sparse attention (kernels/sparse_triton.py) vs PyTorch SDPA dense causal attention, one run, one card.

Shapes (issue 6): bf16, B=1, 32 query heads / 8 KV heads, head dim 128, topk 96 (incl. 1 init + 32 local blocks),
block 64, compressed keys kernel 32 / stride 16. Our times include key compression and block selection.
SDPA peer timed in the same run: PyTorch's default backend choice (the issue's bar); `--flash` adds flash-only.
Variants: token = exact per-token selection; block = one selection per 64-aligned query group (select_tokens 64);
+coarse = softmax normaliser from the coarse keys (kernel 128, stride 64). All are functions of sparse_reference.py.
Decode: one new token per sequence against a cache of T tokens (compressed keys cached, float32 as in the model cache;
`bf16ck` = the same step with bf16 compressed keys), batch 1/8, eager (Python launches) and as one CUDA graph.

Order: the issue's targets first (64K/128K fwd and fwd+bwd, decode 128K batch 8) and their table, then optional tile
sweeps (`--sweep fwd bwd sel`), then 16K (with token mode) and 256K forward; a full table last.

    python bench/bench_sparse.py --out results.json [--budget-s 220] [--sweep fwd bwd sel] [--tuning '{...}']
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import hybridize.kernels  # noqa: F401
except ImportError:  # run from a checkout that is not installed: the repository root holds the package
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybridize.kernels import sparse_reference as ref
from hybridize.kernels import sparse_triton as st

HQ, HKV, D = 32, 8, 128
OPTS = dict(block_size=64, kernel=32, stride=16, topk=96, init_blocks=1, local_blocks=32, dense_len=8192)


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of `reps` calls (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _reps(ms_guess: float) -> int:
    return 3 if ms_guess > 200 else 5 if ms_guess > 30 else 20


def _inputs(T: int, seed: int):
    """Random bf16 q (HQ heads), k, v (HKV heads), an output gradient and positions 0..T-1 for one sequence."""
    torch.manual_seed(seed)
    q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    return q, k, v, torch.randn_like(q), torch.arange(T, device="cuda")


def _variant_opts(name: str) -> dict:
    return dict(OPTS, selection="token" if name.startswith("token") else "block", coarse="coarse" in name)


def bench_prefill(T: int, variants: list[str], backward: bool, flash: bool = False, tuning: dict | None = None) -> dict:
    q, k, v, do, pos = _inputs(T, seed=0)
    out = {"T": T}
    g = HQ // HKV
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # equal heads for both SDPA peers; not timed
    guess = 3.7 * (T / 16384) ** 2
    peers = (("sdpa_default", None), ("sdpa_flash", [SDPBackend.FLASH_ATTENTION])) if flash else (
        ("sdpa_default", None),)
    for peer, backends in peers:
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            out[f"{peer}_fwd"] = timed(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True),
                                       _reps(guess))
            if backward:
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, ke, ve))
                out[f"{peer}_fwdbwd"] = timed(
                    lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do), _reps(4 * guess))
                del qg, kg, vg
    del ke, ve
    torch.cuda.empty_cache()
    for name in variants:
        opts = dict(_variant_opts(name), tuning=tuning)
        try:
            out[f"{name}_fwd"] = timed(lambda: st.infllm_v2_attention_triton(q, k, v, pos, **opts), _reps(guess / 4))
            if backward:
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                out[f"{name}_fwdbwd"] = timed(
                    lambda: st.infllm_v2_attention_triton(qg, kg, vg, pos, **opts).backward(do), _reps(guess))
                del qg, kg, vg
            # Breakdown: compression, selection, attention forward.
            nb = -(-T // 64)
            out[f"{name}_compress"] = timed(lambda: st.compress_keys_triton(k), 10)
            ck = st.compress_keys_triton(k)
            out[f"{name}_select"] = timed(lambda: st.select_blocks_triton(q, ck, pos, nb, scale=D ** -0.5, **opts),
                                          3 if T > 65536 else 5)
            sel = st.select_blocks_triton(q, ck, pos, nb, scale=D ** -0.5, **opts)
            out[f"{name}_blocks_per_query"] = float(sel.counts[0, 0, -1])
            out[f"{name}_attn_fwd"] = timed(
                lambda: st.block_sparse_attention_triton(q, k, v, pos, sel, scale=D ** -0.5, tuning=tuning), 5)
            del sel, ck
        except Exception as e:  # report and go on: the other variants' numbers still stand
            out[f"{name}_error"] = repr(e)[:300]
            print(f"{name} at {T}: {e!r}"[:400], flush=True)
        torch.cuda.empty_cache()
    return out


def bench_decode(T: int, B: int) -> dict:
    torch.manual_seed(0)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    ck = st.compress_keys_triton(k)  # the cache holds these (float32)
    pos = torch.tensor([T - 1], device="cuda")
    g = HQ // HKV
    out = {"T": T, "B": B}
    dense = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    out["sdpa_default"] = timed(dense, 20)
    out["sdpa_default_graph"] = _graph_time(dense)
    # The group's query heads as rows of one query block (reads each K/V once, flash): the fastest dense decode.
    qr = q.view(B, HKV, g, D)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        rows = lambda: F.scaled_dot_product_attention(qr, k, v)  # noqa: E731
        out["sdpa_rows"] = timed(rows, 20)
        out["sdpa_rows_graph"] = _graph_time(rows)
    # Correctness of the fused decode path at this size: selection vs the reference, output given the selection.
    try:
        nb = -(-T // 64)
        sel = st.decode_select_triton(q, ck, pos, nb, scale=D ** -0.5, **OPTS).token_mask()
        want = ref.select_blocks(q, ck, pos, nb, scale=D ** -0.5, **OPTS)
        out["check_rows_equal"] = float((sel == want).all(-1).float().mean())
        o = st.infllm_v2_attention_triton(q, k, v, pos, ck, **OPTS)
        o_ref = ref.block_sparse_attention(q.float(), k.float(), v.float(), pos, sel, scale=D ** -0.5)
        out["check_out_err"] = float((o.float() - o_ref).abs().max())
        out["check_blocks"] = float(sel.sum(-1).float().mean())
        del o_ref
    except Exception as e:
        out["check_error"] = repr(e)[:300]
        print("decode check failed:", repr(e)[:300], flush=True)
    torch.cuda.empty_cache()
    k2 = st.coarse_from_compressed(ck, 32, 16)  # a cache would hold these too
    variants = (("token", ck, {}), ("token+bf16ck", ck.to(torch.bfloat16), {}),
                ("token+coarse", ck, {"coarse": True, "coarse_keys": k2}))
    for name, cks, extra in variants:
        opts = dict(OPTS, **extra)
        step = lambda: st.infllm_v2_attention_triton(q, k, v, pos, cks, **opts)  # noqa: E731
        try:
            out[name] = timed(step, 30, warmup=3)
            out[name + "_graph"] = _graph_time(step)
        except Exception as e:
            out[name + "_error"] = repr(e)[:300]
            print(f"decode {name}: {e!r}"[:400], flush=True)
    return out


SWEEP = {  # tile configurations of the prefill kernels, timed at one length (block+coarse selection)
    "fwd": [{}, {"fwd_pipe": True}, {"fwd_pair": True}, {"fwd_rows": 256, "fwd_warps": 16, "fwd_stages": 2}],
    "sel": [{}, {"sel_pipe": True}, {"sel_rows": 128, "sel_warps": 4}, {"sel_stages": 3}],
    "bwd": [{}, {"bwd_warps": 8}],
}


def profile_kernels(T: int, variant: str, tuning: dict | None = None) -> str:
    """Per-kernel GPU time of one forward and one forward+backward (torch.profiler), as a short table."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(2)
    q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T, device="cuda")
    opts = dict(_variant_opts(variant), tuning=tuning)
    st.infllm_v2_attention_triton(q, k, v, pos, **opts).sum().backward()  # warm-up (compilation)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        st.infllm_v2_attention_triton(q, k, v, pos, **opts).sum().backward()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    try:
        return avg.table(sort_by="device_time_total", row_limit=14, max_name_column_width=40)
    except Exception:  # older spelling
        return avg.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40)


def bench_sweep(T: int, parts: list[str], budget_s: float) -> dict:
    """Each tile configuration of SWEEP: its time and its largest difference from the default configuration."""
    t0 = time.time()
    q, k, v, do, pos = _inputs(T, seed=1)
    opts = dict(OPTS, selection="block", coarse=True)
    ck = st.compress_keys_triton(k)
    nb = -(-T // 64)
    sel = st.select_blocks_triton(q, ck, pos, nb, scale=D ** -0.5, **opts)
    out = {"T": T}
    ref_o = ref_g = ref_sel = None
    for part in parts:
        for cfg in SWEEP[part]:
            if time.time() - t0 > budget_s:
                out.setdefault("skipped", []).append([part, cfg])
                continue
            key = f"{part} {json.dumps(cfg)}"
            try:
                if part == "fwd":
                    fn = lambda: st.block_sparse_attention_triton(q, k, v, pos, sel, scale=D ** -0.5, tuning=cfg)  # noqa
                    o = fn()
                    ref_o = o if ref_o is None else ref_o
                    out[key] = [timed(fn, 5), float((o.float() - ref_o.float()).abs().max())]
                elif part == "bwd":
                    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                    o = st.block_sparse_attention_triton(qg, kg, vg, pos, sel, scale=D ** -0.5, tuning=cfg)
                    grads = torch.autograd.grad(o, (qg, kg, vg), do)
                    ref_g = grads if ref_g is None else ref_g
                    err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads, ref_g))
                    fn = lambda: st.block_sparse_attention_triton(  # noqa: E731
                        qg, kg, vg, pos, sel, scale=D ** -0.5, tuning=cfg).backward(do)
                    out[key] = [timed(fn, 3), err]
                    del qg, kg, vg, grads, o
                else:
                    fn = lambda: st.select_blocks_triton(q, ck, pos, nb, scale=D ** -0.5, tuning=cfg, **opts)  # noqa
                    s2 = fn()
                    ref_sel = s2 if ref_sel is None else ref_sel
                    valid = torch.arange(s2.lists.shape[-1], device="cuda") < ref_sel.counts.unsqueeze(-1)
                    same = float(((s2.lists == ref_sel.lists) | ~valid).all(-1).float().mean())
                    out[key] = [timed(fn, 5), same]
            except Exception as e:
                out[key] = repr(e)[:200]
            print(key, out[key], f"[{time.time() - t0:.0f}s]", flush=True)
    return out


def _graph_time(fn):
    """The step replayed as one CUDA graph (no Python/launch overhead), as a serving loop would run it."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay, 20)
    except Exception as e:  # report, do not hide: the eager number still stands
        print("graph capture failed:", repr(e)[:200], flush=True)
        return None


def _x(base, x):
    return "-" if x is None or base is None else f"{x:.2f} ({base / x:.2f}x)"


def _xd(base, x):
    return "-" if x is None or base is None else f"{x:.3f} ({base / x:.2f}x)"


def print_tables(res: dict, variants: list[str]) -> None:
    print(f"\n{res['device']}, torch {res['torch']}, triton {res['triton']}; ms (median); speedup = SDPA default "
          "backend / ours")
    print("| T | pass | SDPA default | SDPA flash | " + " | ".join(variants) + " |")
    print("|---|---|---|---|" + "---|" * len(variants))
    for r in res["prefill"]:
        for ps in ("fwd", "fwdbwd"):
            base = r.get(f"sdpa_default_{ps}")
            if base is None:
                continue
            cells = [_x(base, r.get(f"{v}_{ps}")) for v in variants]
            fl = r.get(f"sdpa_flash_{ps}")
            label = f"{r['T'] // 1024}K" + (" (tuned)" if "tuning" in r else "")
            print(f"| {label} | {ps} | {base:.2f} | {'-' if fl is None else f'{fl:.2f}'} | "
                  + " | ".join(cells) + " |")
    print("\nbreakdown (ms): compress / select / attention fwd")
    for r in res["prefill"]:
        for v in variants:
            if f"{v}_select" in r:
                print(f"  {r['T'] // 1024}K {v}: {r[f'{v}_compress']:.2f} / {r[f'{v}_select']:.2f} / "
                      f"{r[f'{v}_attn_fwd']:.2f}  blocks/query(last)={r.get(f'{v}_blocks_per_query')}")
    if not res["decode"]:
        return
    print("\ndecode; speedups: eager vs SDPA default eager, graph vs the faster SDPA graph")
    print("| T | B | SDPA default | SDPA rows | ours eager | bf16ck eager | coarse eager | SDPA graph (best) | "
          "ours graph | bf16ck graph | check (rows equal, max err) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["decode"]:
        b = r["sdpa_default"]
        gs = [x for x in (r.get("sdpa_default_graph"), r.get("sdpa_rows_graph")) if x is not None]
        bg = min(gs) if gs else None
        print(f"| {r['T'] // 1024}K | {r['B']} | {b:.3f} | {r['sdpa_rows']:.3f} | {_xd(b, r.get('token'))} | "
              f"{_xd(b, r.get('token+bf16ck'))} | {_xd(b, r.get('token+coarse'))} | "
              f"{'-' if bg is None else f'{bg:.3f}'} | {_xd(bg, r.get('token_graph'))} | "
              f"{_xd(bg, r.get('token+bf16ck_graph'))} | {r.get('check_rows_equal')}, {r.get('check_out_err')} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[65536, 131072], help="fwd and fwd+bwd, first")
    p.add_argument("--decode", type=int, nargs="*", default=[131072, 32768])
    p.add_argument("--variants", nargs="*", default=["block", "block+coarse"])
    p.add_argument("--sweep", nargs="*", default=[], choices=sorted(SWEEP), help="tile sweeps at --sweep-len")
    p.add_argument("--sweep-len", type=int, default=131072)
    p.add_argument("--more-lengths", type=int, nargs="*", default=[16384], help="fwd and fwd+bwd, after the rest")
    p.add_argument("--fwd-only", type=int, nargs="*", default=[262144])
    p.add_argument("--more-variants", nargs="*", default=["token"], help="extra variants at --more-lengths")
    p.add_argument("--flash", action="store_true", help="also time SDPA restricted to the flash backend")
    p.add_argument("--profile", action="store_true", help="per-kernel times of one block+coarse fwd+bwd")
    p.add_argument("--retune", action="store_true", help="after the sweeps: the targets again with the best tiles")
    p.add_argument("--tuning", default="{}", help="JSON tile configuration for our kernels (see SWEEP)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import triton

    tuning = json.loads(args.tuning)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "tuning": tuning, "prefill": [], "decode": [], "sweep": None, "skipped": []}
    t0 = time.time()

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    def left():
        return args.budget_s - (time.time() - t0)

    cost = {16384: 10, 32768: 15, 65536: 30, 131072: 60, 262144: 60}  # rough seconds per length
    # 1. The targets: 64K / 128K fwd and fwd+bwd, then decode at 128K (batch 8 first).
    for T in args.lengths:
        if left() < cost.get(T, 60):
            res["skipped"].append(T)
            continue
        res["prefill"].append(bench_prefill(T, args.variants, backward=True, flash=args.flash, tuning=tuning))
        print(json.dumps(res["prefill"][-1]), f"[{time.time() - t0:.0f}s]", flush=True)
        save()
    for T in args.decode:
        for B in (8, 1):
            if left() < 10:
                res["skipped"].append((T, B))
                continue
            res["decode"].append(bench_decode(T, B))
            print(json.dumps(res["decode"][-1]), f"[{time.time() - t0:.0f}s]", flush=True)
            save()
    print_tables(res, args.variants)
    # 2. Where the time goes (one profiled fwd+bwd), tile sweeps, then the other lengths.
    if args.profile and left() > 30:
        try:
            res["profile"] = profile_kernels(args.sweep_len, "block+coarse", tuning)
            print(res["profile"], flush=True)
        except Exception as e:
            print("profile failed:", repr(e)[:300], flush=True)
    if args.sweep and left() > 30:
        res["sweep"] = bench_sweep(args.sweep_len, args.sweep, left() - 20)
        save()
        if args.retune:  # the fastest configuration of each part (same result), then the targets again with it
            best = dict(tuning)
            for part in args.sweep:
                ok = []
                for key, val in res["sweep"].items():
                    if not key.startswith(part + " ") or not isinstance(val, list):
                        continue
                    good = val[1] >= 0.99 if part == "sel" else val[1] < (2e-2 if part == "fwd" else 6e-2)
                    if good:
                        ok.append((val[0], json.loads(key[len(part) + 1:])))
                if ok:
                    best.update(min(ok, key=lambda x: x[0])[1])
            res["retuned"] = best
            print("retuned:", json.dumps(best), flush=True)
            for T in args.lengths:
                if left() < cost.get(T, 60):
                    res["skipped"].append(("retuned", T))
                    continue
                r = bench_prefill(T, args.variants, backward=True, flash=False, tuning=best)
                r["tuning"] = best
                res["prefill"].append(r)
                print(json.dumps(r), f"[{time.time() - t0:.0f}s]", flush=True)
                save()
            print_tables(dict(res, prefill=[r for r in res["prefill"] if "tuning" in r], decode=[]), args.variants)
    more = args.variants + [v for v in args.more_variants if v not in args.variants]
    for T in list(args.more_lengths) + list(args.fwd_only):
        if left() < cost.get(T, 60):
            res["skipped"].append(T)
            continue
        res["prefill"].append(bench_prefill(T, more if T <= 65536 else args.variants,
                                            backward=T not in args.fwd_only, flash=args.flash, tuning=tuning))
        print(json.dumps(res["prefill"][-1]), f"[{time.time() - t0:.0f}s]", flush=True)
        save()
    if res["sweep"]:
        print("\nsweep at", res["sweep"]["T"], "(ms, max diff from the first / share of equal selections)")
        for key, val in res["sweep"].items():
            if key != "T":
                print(" ", key, val)
    print_tables(res, more)
    print("skipped:", res["skipped"])


if __name__ == "__main__":
    main()
