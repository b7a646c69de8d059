"""InfLLM-V2 sparse attention (kernels/sparse_triton.py) vs PyTorch SDPA dense causal attention, one run, one card.

Shapes (issue 6): bf16, B=1, 32 query heads / 8 KV heads, head dim 128, topk 96 (incl. 1 init + 32 local blocks),
block 64, compressed keys kernel 32 / stride 16. Our times include key compression and block selection.
SDPA peers, both timed in the same run: PyTorch's default backend choice (the issue's bar) and flash-only.
Variants: token = exact per-token selection; block = one selection per 64-aligned query group (select_tokens 64);
+coarse = softmax normaliser from the coarse keys (kernel 128, stride 64). All are functions of sparse_reference.py.
Decode: one new token per sequence against a cache of T tokens (compressed keys cached, float32 as in the model cache;
`bf16ck` = the same step with bf16 compressed keys), batch 1/8, eager (Python launches) and as one CUDA graph.

    python bench/bench_sparse.py --out results.json [--budget-s 220]
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


def _variant_opts(name: str) -> dict:
    return dict(OPTS, selection="token" if name.startswith("token") else "block", coarse="coarse" in name)


def bench_prefill(T: int, variants: list[str], backward: bool) -> dict:
    torch.manual_seed(0)
    q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    pos = torch.arange(T, device="cuda")
    out = {"T": T}
    g = HQ // HKV
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # equal heads for both SDPA peers; not timed
    guess = 3.7 * (T / 16384) ** 2
    for peer, backends in (("sdpa_default", None), ("sdpa_flash", [SDPBackend.FLASH_ATTENTION])):
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
        opts = _variant_opts(name)
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
            out[f"{name}_blocks_per_query"] = float(sel.token_mask()[0, 0, -1].sum()) if T <= 65536 else None
            out[f"{name}_attn_fwd"] = timed(
                lambda: st.block_sparse_attention_triton(q, k, v, pos, sel, scale=D ** -0.5), 5)
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
            print(f"| {r['T'] // 1024}K | {ps} | {base:.2f} | {r[f'sdpa_flash_{ps}']:.2f} | " + " | ".join(cells) + " |")
    print("\nbreakdown (ms): compress / select / attention fwd")
    for r in res["prefill"]:
        for v in variants:
            if f"{v}_select" in r:
                print(f"  {r['T'] // 1024}K {v}: {r[f'{v}_compress']:.2f} / {r[f'{v}_select']:.2f} / "
                      f"{r[f'{v}_attn_fwd']:.2f}  blocks/query(last)={r.get(f'{v}_blocks_per_query')}")
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
    p.add_argument("--lengths", type=int, nargs="*", default=[16384, 65536, 131072])
    p.add_argument("--fwd-only", type=int, nargs="*", default=[262144])
    p.add_argument("--decode", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--variants", nargs="*", default=["block", "block+coarse", "token"])
    p.add_argument("--token-max", type=int, default=131072, help="longest T for the (slower) exact token mode")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "prefill": [], "decode": [], "skipped": []}
    t0 = time.time()

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    def left():
        return args.budget_s - (time.time() - t0)

    for T in args.decode:  # the decode target first: cheap
        for B in (1, 8):
            r = bench_decode(T, B)
            res["decode"].append(r)
            print(json.dumps(r), f"[{time.time() - t0:.0f}s]", flush=True)
            save()
    # rough cost of one length in seconds (SDPA peers at 2 backends + our variants, with warm-up)
    cost = {16384: 10, 65536: 30, 131072: 60, 262144: 60}
    for T in list(args.lengths) + list(args.fwd_only):
        if left() < cost.get(T, 60):
            res["skipped"].append(T)
            print(f"skipping T={T}: {left():.0f}s left", flush=True)
            continue
        variants = [v for v in args.variants if not v.startswith("token") or T <= args.token_max]
        r = bench_prefill(T, variants, backward=T not in args.fwd_only)
        res["prefill"].append(r)
        print(json.dumps(r), f"[{time.time() - t0:.0f}s]", flush=True)
        save()
    print_tables(res, args.variants)


if __name__ == "__main__":
    main()
