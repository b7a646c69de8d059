"""The Lightning layers' window branch on a GPU: the Triton kernel (kernels/window_triton.py) against the blocked SDPA
form it replaces (kernels/window_reference.window_attention), forward and forward + backward, bf16, SmolLM2's heads
(9 query, 3 key/value, 64 wide), the recipe's 256-token window and 4 sinks, in the shapes training hands over:
distillation's packed 2K rows (16 rows of documents) and the long stage's 16K rows.

    python bench/bench_window.py [--window 256] [--sinks 4] [--repeat 10] [--out results.json]

Prints one row per shape and pass: milliseconds of each (median of --repeat timed calls after two untimed ones),
their ratio, peak memory, and the largest output / gradient difference between the two.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_sparse import timed  # bench/ is the script's folder, so on its path
from hybridize.kernels.window_reference import window_attention as window_sdpa
from hybridize.kernels.window_triton import window_attention_triton

HQ, HKV, D = 9, 3, 64
# (name, rows, tokens per row, document lengths in a row: packed like the recipe's rows)
SHAPES = (("distil 16 x 2K packed", 16, 2048, (700, 510, 838)),
          ("long 1 x 16K packed", 1, 16384, (9000, 7384)),
          ("long 1 x 16K one document", 1, 16384, (16384,)))


def run(fn, q, k, v, grad, backward: bool, **kw):
    out = fn(q, k, v, **kw)
    if backward:
        return out, torch.autograd.grad(out, (q, k, v), grad)
    return out, ()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_window.py needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, B, T, docs in SHAPES:
        q, k, v = (torch.randn(1 if len(docs) > 1 else B, h, B * T if len(docs) > 1 else T, D, device="cuda",
                               generator=g).to(torch.bfloat16).requires_grad_() for h in (HQ, HKV, HKV))
        grad = torch.randn_like(q)
        kw = dict(window=args.window, sinks=args.sinks)
        if len(docs) > 1:  # the rows laid end to end as one packed row, as the trainer's cu_seqlens give them
            bounds = [0]
            for _ in range(B):
                for n in docs:
                    bounds.append(bounds[-1] + n)
            kw["cu_seqlens"] = torch.tensor(bounds, device="cuda", dtype=torch.int32)
        for backward in (False, True):
            ms = {}
            for label, fn in (("sdpa", window_sdpa), ("triton", window_attention_triton)):
                torch.cuda.reset_peak_memory_stats()
                ms[label] = timed(lambda: run(fn, q, k, v, grad, backward, **kw), args.repeat, warmup=2)
                ms[label + "_gib"] = torch.cuda.max_memory_allocated() / 2**30
            ref, ref_grads = run(window_sdpa, q, k, v, grad, backward, **kw)
            out, grads = run(window_attention_triton, q, k, v, grad, backward, **kw)
            rows.append(dict(shape=name, tokens=q.shape[2] * q.shape[0], pass_="fwd+bwd" if backward else "fwd",
                             sdpa_ms=ms["sdpa"], triton_ms=ms["triton"], speedup=ms["sdpa"] / ms["triton"],
                             sdpa_peak_gib=ms["sdpa_gib"], triton_peak_gib=ms["triton_gib"],
                             out_max_diff=float((out.float() - ref.float()).abs().max()),
                             grad_max_diff=max((float((a.float() - b.float()).abs().max())
                                                for a, b in zip(grads, ref_grads)), default=0.0)))
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, window=args.window, sinks=args.sinks,
                heads=[HQ, HKV, D], rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    print(f"| shape | pass | SDPA form ms | Triton ms | speed-up | peak GiB SDPA / Triton | out / grad max diff |"
          f"  ({info['device']}, torch {torch.__version__}, window {args.window} + {args.sinks} sinks)")
    for r in rows:
        print(f"| {r['shape']} | {r['pass_']} | {r['sdpa_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{r['sdpa_peak_gib']:.2f} / {r['triton_peak_gib']:.2f} | {r['out_max_diff']:.1e} / "
              f"{r['grad_max_diff']:.1e} |")


if __name__ == "__main__":
    main()
