"""Is decoding through the whole hybrid bound by the GPU or by the host? One decode step's wall time against the GPU
time of the kernels it launches, per batch size, for the eager step and the step replayed from CUDA graphs
(issue 18, item 4).

    python bench/profile_decode.py [--shape llama3-8b] [--context 8K] [--batches 1,8,16] [--steps 8]
                                   [--graphs both|eager|graphs] [--out DIR]
    python bench/profile_decode.py --shape tiny --context 256 --batches 1,2 --steps 2     # CPU check

The full-depth hybrid (random bf16 weights, the builders of bench/profile_prefill.py) is prefilled once at
--context, then for each batch (rows of the same cache) and each path (`config.decode_cuda_graphs` off, then on) it
decodes --steps untimed steps (at least 3: Triton compiles, and the graphs are recorded after two eager steps),
--steps timed ones (synchronised, median wall time per step), and one step under torch.profiler: the sum of its GPU
kernel times, the kernels it ran and the launches the host made (kernel launches, graph launches, copies and fills).
A wall time far above the GPU time means the step waits on the host (Python, dispatch, launches); replayed from CUDA
graphs only the sparse layers' attention is still launched one kernel at a time. The context length changes the
sparse layers' work only, so a short one measures the host's share as well as 128K does, in a fraction of the time.
On a machine without CUDA the graph rows are skipped, with a note.
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


# Host-side calls that put work on the GPU: kernel launches (runtime and driver API: Triton launches through the
# driver), graph launches, copies and fills.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                "cudaMemcpyAsync", "cudaMemsetAsync")
PATHS = {"eager": False, "graphs": True}


def launches(prof) -> int:
    """Host calls of one profiled step that launched GPU work."""
    return sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU
               and e.name in LAUNCH_CALLS)


def gpu_kernel_ms(prof) -> float:
    """Sum of the device-side kernel times of one profiled step, in ms."""
    total_us = 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            total_us += e.device_time if hasattr(e, "device_time") else e.cuda_time
    return total_us / 1000.0


def measure(model, cache, logits, steps: int, device, untimed: int):
    """(row of measurements, logits, cache) of decoding `steps` timed steps after `untimed` ones."""
    step = lambda lg: forward_chunk(model, lg.argmax(-1)[:, None], cache)  # noqa: E731
    for _ in range(untimed):  # Triton compiles per batch size and cache-length divisibility; graphs get recorded
        logits, cache = step(logits)
        logits = logits[:, -1]
    wall = []
    for _ in range(steps):
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
    median = statistics.median(wall)
    row = {"wall_ms_median": median, "gpu_kernel_ms": gpu_kernel_ms(prof), "kernels": kernels,
           "launches": launches(prof), "profiled_step_ms": profiled_ms, "tokens_per_s": logits.shape[0] / median * 1000}
    return row, logits, cache


def graph_steps(model) -> int:
    graphs = getattr(model, "decode_graphs", None)
    return graphs.paths["graph"] if graphs is not None else 0


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(FULL_LAYERS))
    ap.add_argument("--context", default="8K")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--graphs", default="both", choices=["both", *PATHS],
                    help="which decode path(s) to measure: the eager step, the CUDA-graph step, or both side by side")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.shape, FULL_LAYERS[args.shape], dtype, device, hybrid=True).eval()
    paths = list(PATHS) if args.graphs == "both" else [args.graphs]
    if device.type != "cuda" and "graphs" in paths:
        print("CUDA graphs: unavailable without a CUDA device (a CPU decode step always runs eagerly); "
              "measuring the eager step only")
        paths = ["eager"]
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
        for path in paths:
            model.config.decode_cuda_graphs = PATHS[path]
            before = graph_steps(model)
            row, logits, cache = measure(model, cache, logits, args.steps, device, untimed=max(args.steps, 3))
            row = {"batch": b, "path": path, **row}
            if path == "graphs":
                # every timed and profiled step must have replayed the graphs, or the row measures something else
                replayed = graph_steps(model) - before
                row["graph_steps"] = replayed
                if replayed < args.steps + 1:
                    row["note"] = f"graph path refused: {dict(model.decode_graphs.refusals)}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n| batch | path | step wall ms (median of {args.steps}) | GPU kernel ms in one step | kernels "
          f"| host launches | tokens/s | GPU share | speed-up |  ({name}, context {args.context})")
    print("|---|---|---|---|---|---|---|---|---|")
    eager_wall = {r["batch"]: r["wall_ms_median"] for r in rows if r["path"] == "eager"}
    for r in rows:
        share = r["gpu_kernel_ms"] / r["wall_ms_median"] if r["wall_ms_median"] else 0.0
        base = eager_wall.get(r["batch"])
        speedup = f"{base / r['wall_ms_median']:.2f}x" if base and r["wall_ms_median"] else "-"
        note = f" {r['note']}" if "note" in r else ""
        print(f"| {r['batch']} | {r['path']} | {r['wall_ms_median']:.2f} | {r['gpu_kernel_ms']:.2f} | {r['kernels']} "
              f"| {r['launches']} | {r['tokens_per_s']:.1f} | {share:.0%} | {speedup} |{note}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        info = {"device": name, "shape": args.shape, "context": context, "torch": torch.__version__, "rows": rows}
        (Path(args.out) / "decode_profile.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
