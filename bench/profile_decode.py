"""Is decoding through the whole hybrid bound by the GPU or by the host? One decode step's wall time against the GPU
time of the kernels it launches, per batch size (issue 18, item 4).

    python bench/profile_decode.py [--shape llama3-8b] [--context 8K] [--batches 1,8,16] [--steps 8] [--out DIR]
    python bench/profile_decode.py --shape tiny --context 256 --batches 1,2 --steps 2     # CPU check

The full-depth hybrid (random bf16 weights, the builders of bench/profile_prefill.py) is prefilled once at
--context, then for each batch (rows of the same cache) it decodes --steps untimed steps, --steps timed ones
(synchronised, median wall time per step), and one step under torch.profiler: the sum of its GPU kernel times
and the host time spent launching them. A wall time far above the GPU time means the step waits on the host
(Python, dispatch, launches), and a CUDA graph of the step is what would close it; a wall time close to the GPU
time means the kernels themselves are the work. The context length changes the sparse layers' work only, so a
short one measures the host's share as well as 128K does, in a fraction of the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hybridize.eval.prefill import forward_chunk, prefill
from hybridize.eval.speed import parse_length, widen_batch

from profile_prefill import FULL_LAYERS, build, sync


def gpu_kernel_ms(prof) -> float:
    """Sum of the device-side kernel times of one profiled step, in ms."""
    total_us = 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            total_us += e.device_time if hasattr(e, "device_time") else e.cuda_time
    return total_us / 1000.0


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(FULL_LAYERS))
    ap.add_argument("--context", default="8K")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.shape, FULL_LAYERS[args.shape], dtype, device, hybrid=True).eval()
    context = parse_length(args.context)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    state = prefill(model, ids.to(device), min(16384, context))
    sync(device)
    print(f"{args.shape} hybrid, {FULL_LAYERS[args.shape]} layers, prefill {args.context}: {time.perf_counter() - t:.2f} s")
    cache, logits, done = state.cache, state.logits, 1
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        if b > done:
            logits, done = widen_batch(cache, logits, done, b), b
        step = lambda lg: forward_chunk(model, lg.argmax(-1)[:, None], cache)  # noqa: E731
        for _ in range(args.steps):  # untimed: Triton compiles per batch size and cache-length divisibility
            logits, cache = step(logits)
            logits = logits[:, -1]
        wall = []
        for _ in range(args.steps):
            sync(device)
            t = time.perf_counter()
            logits, cache = step(logits)
            logits = logits[:, -1]
            sync(device)
            wall.append((time.perf_counter() - t) * 1000)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync(device)
        t = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            logits, cache = step(logits)
            logits = logits[:, -1]
            sync(device)
        profiled_ms = (time.perf_counter() - t) * 1000
        kernels = sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        row = {"batch": b, "wall_ms_median": statistics.median(wall), "gpu_kernel_ms": gpu_kernel_ms(prof),
               "kernels": kernels, "profiled_step_ms": profiled_ms, "tokens_per_s": b / statistics.median(wall) * 1000}
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n| batch | step wall ms (median of {args.steps}) | GPU kernel ms in one step | kernels | GPU share |  ({name}, "
          f"context {args.context})")
    print("|---|---|---|---|---|")
    for r in rows:
        share = r["gpu_kernel_ms"] / r["wall_ms_median"] if r["wall_ms_median"] else 0.0
        print(f"| {r['batch']} | {r['wall_ms_median']:.2f} | {r['gpu_kernel_ms']:.2f} | {r['kernels']} | {share:.0%} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        info = {"device": name, "shape": args.shape, "context": context, "torch": torch.__version__, "rows": rows}
        (Path(args.out) / "decode_profile.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
