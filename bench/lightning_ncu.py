"""Nsight Compute target: one Lightning forward (no grad) of ours and of fla at one length, inside a profiler range.

Run under ncu so that only the marked iterations are profiled (warm-up and compilation happen before the range):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
        python3 bench/lightning_ncu.py --T 65536

Shapes as bench_lightning.py: bf16, B = 1, 32 heads, d = 128, SALA decays. Without ncu it just prints the times.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from hybridize.kernels import lightning_triton as LT

sys.path.insert(0, str(Path(__file__).parent))
from bench_lightning import sala_log_decay  # noqa: E402

H, D = 32, 128


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument("--walk-qk-hint", default=None, help="ScanConfig.walk_qk_hint for ours (default: the shipped one)")
    args = ap.parse_args()
    ld = sala_log_decay(H)
    q, k, v = (torch.randn(1, H, args.T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = LT.DEFAULT_CONFIG
    if args.walk_qk_hint is not None:
        cfg = dataclasses.replace(cfg, walk_qk_hint=args.walk_qk_hint)
    runs = {"ours": lambda: LT.lightning_attn_chunked_triton(q, k, v, ld, config=cfg)[0]}
    if not args.skip_fla:
        try:
            from fla.ops.simple_gla import chunk_simple_gla
        except ImportError as err:
            print(f"fla not importable: {err}")
        else:
            qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            runs["fla"] = lambda: chunk_simple_gla(qf, kf, vf, g_gamma=ld, scale=D ** -0.5)[0]
    with torch.no_grad():
        for name, fn in runs.items():
            ms = do_bench(fn, warmup=5, rep=20, return_mode="median")  # compiles, autotunes
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"{name}: T={args.T} fwd {ms:.3f} ms (do_bench median, outside the profiled launch)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
