"""Where the prefill time of a Llama-3-8B-shaped dense model and its 1:3 hybrid goes, per layer kind and per op class.

    python bench/profile_prefill.py [--layers 4] [--lengths 128K,256K] [--profile-length 128K] [--out DIR]
    python bench/profile_prefill.py --shape tiny --lengths 4K --profile-length 4K --chunk 1024   # CPU check

Both models are built with FEW layers (default 4: the hybrid 3 Lightning + 1 sparse, the dense model 4 softmax
layers; random bf16 weights; the builders of bench_model.py / hybridize.eval.speed) and prefilled the way
bench_model.py does: the dense model in one pass (one causal SDPA call per layer), the hybrid in chunks through its
cache. Per model:
- plain wall-clock TTFT per length, and CUDA-event time per layer kind split into token mixer, MLP and the rest
  (norms, residual adds), scaled to the full 32-layer model (24 Lightning + 8 sparse; 32 dense layers);
- one prefill of --profile-length under torch.profiler (CUDA activity): the top kernels by GPU time, GPU time per op
  class (GEMM, SDPA, Lightning scan, sparse kernels, compiled elementwise, eager elementwise, reductions, copies) and,
  where the profiler links kernels to their launching op, per layer kind.
The hybrid runs twice, with the fused (torch.compile'd) elementwise pieces off and on (`config.fused_elementwise`), and then with
larger prefill chunks (--hybrid-chunks). Everything printed also goes to OUT/profile.txt, the numbers to
OUT/profile.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from hybridize.common import format_length
from hybridize.eval.prefill import prefill, use_chunked_sdpa
from hybridize.eval.speed import parse_length, random_model, shape_config
from hybridize.select.placement import layer_types_for

FULL_LAYERS = {"llama3-8b": 32, "smollm2-135m": 30, "tiny": 4}


def build(shape: str, layers: int, dtype, device, hybrid: bool, lightning_kv_heads: str = "query"):
    from hybridize.convert.build import hybrid_config_from_source

    src = shape_config(shape)
    src.num_hidden_layers = layers
    if not hybrid:
        return random_model(src, dtype, device)
    config = hybrid_config_from_source(src, layer_types_for(layers, "1:3"), lightning_kv_heads=lightning_kv_heads)
    return random_model(config, dtype, device)


def layer_kind(layer) -> str:
    return getattr(layer, "layer_type", "dense")


def decoder_layers(model):
    return list(model.model.layers)


class PartTimer:
    """CUDA events around every decoder layer, its token mixer and its MLP (forward hooks); ms per (kind, part)."""

    def __init__(self, model, device):
        self.on = False
        self.cuda = device.type == "cuda"
        self.pairs: list[tuple[str, str, object, object]] = []
        self._open: dict[int, object] = {}
        self.handles = []
        for layer in decoder_layers(model):
            kind = layer_kind(layer)
            for part, mod in (("layer", layer), ("mixer", layer.self_attn), ("mlp", layer.mlp)):
                self.handles.append(mod.register_forward_pre_hook(self._pre))
                self.handles.append(mod.register_forward_hook(self._post(kind, part)))

    def _event(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, mod, args):
        if self.on:
            self._open[id(mod)] = self._event()

    def _post(self, kind, part):
        def hook(mod, args, out):
            if self.on and id(mod) in self._open:
                self.pairs.append((kind, part, self._open.pop(id(mod)), self._event()))
        return hook

    def collect(self) -> dict[str, dict[str, float]]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for kind, part, a, b in self.pairs:
            out[kind][part] += a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        self.pairs.clear()
        res = {}
        for kind, parts in out.items():
            parts = dict(parts)
            parts["other"] = parts.get("layer", 0.0) - parts.get("mixer", 0.0) - parts.get("mlp", 0.0)
            res[kind] = parts
        return res

    def remove(self):
        for h in self.handles:
            h.remove()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_prefill(model, length: int, chunk: int, device, timer: PartTimer | None = None) -> tuple[float, dict]:
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    sync(device)
    if timer is not None:
        timer.on = True
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = prefill(model, ids, chunk).logits
    sync(device)
    dt = time.perf_counter() - t0
    parts = {}
    if timer is not None:
        timer.on = False
        parts = timer.collect()
    timed_prefill.last_logits = logits.float().cpu()
    return dt, parts


def op_class(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_") or "fused" in n and "triton" in n:
        return "compiled elementwise (inductor)"
    if any(s in n for s in ("_scan_chunks", "_fwd_lookback", "_decode_step", "lightning")):
        return "Lightning scan"
    if "norm_gate" in n:
        return "fused norm+gate"
    if any(s in n for s in ("_compress_kernel", "_select_scores", "_block_scores", "_block_topk", "_attn_fwd_kernel",
                            "_decode_", "_row_tile")):
        return "sparse kernels"
    if any(s in n for s in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "SDPA"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "matmul", "ampere", "hopper")):
        return "GEMM"
    if any(s in n for s in ("reduce", "norm", "softmax", "sum", "mean")):
        return "reduction"
    if any(s in n for s in ("cat", "copy", "memcpy", "memset", "fill")):
        return "copy / cat / fill"
    if any(s in n for s in ("elementwise", "vectorized", "unrolled", "pointwise")):
        return "eager elementwise"
    return "other"


def profile_prefill(model, length: int, chunk: int, device, log, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    handles = []
    ranges: dict[int, object] = {}
    for layer in decoder_layers(model):  # a named range per layer kind, to attribute kernels where possible
        kind = layer_kind(layer)

        def pre(mod, args, kind=kind):
            ranges[id(mod)] = record_function(f"layer|{kind}")
            ranges[id(mod)].__enter__()

        def post(mod, args, out):
            r = ranges.pop(id(mod), None)
            if r is not None:
                r.__exit__(None, None, None)

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    sync(device)
    with profile(activities=acts) as prof, torch.no_grad():
        prefill(model, ids, chunk)
        sync(device)
    for h in handles:
        h.remove()
    kernels: dict[str, float] = defaultdict(float)  # kernel name -> us
    counts: dict[str, int] = defaultdict(int)
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in prof.events():
        dev = str(getattr(e, "device_type", ""))
        if device.type == "cuda" and "CUDA" in dev and not e.name.startswith("layer|"):  # (not the ranges)
            kernels[e.name] += e.time_range.elapsed_us()
            counts[e.name] += 1
        ks = getattr(e, "kernels", None) or []
        if ks:  # kernels linked to this CPU op: find the layer range above it
            p, kind = e, None
            while p is not None:
                if p.name.startswith("layer|"):
                    kind = p.name.split("|", 1)[1]
                    break
                p = p.cpu_parent
            for k in ks:
                by_kind[kind or "outside layers"][op_class(k.name)] += k.duration
    total = sum(kernels.values())
    log(f"  GPU kernel time total {total / 1e3:.1f} ms; top {top} kernels:")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        log(f"    {us / 1e3:9.2f} ms {100 * us / max(total, 1):5.1f}%  x{counts[name]:<5d} [{op_class(name)}] {name[:110]}")
    classes: dict[str, float] = defaultdict(float)
    for name, us in kernels.items():
        classes[op_class(name)] += us
    log("  GPU time per op class:")
    for c, us in sorted(classes.items(), key=lambda kv: -kv[1]):
        log(f"    {c:34s} {us / 1e3:9.2f} ms {100 * us / max(total, 1):5.1f}%")
    if by_kind:
        log("  GPU time per layer kind and op class (kernels linked to their launching op):")
        for kind, cl in by_kind.items():
            s = sum(cl.values())
            log(f"    {kind}: {s / 1e3:.1f} ms = " + ", ".join(
                f"{c} {us / 1e3:.1f}" for c, us in sorted(cl.items(), key=lambda kv: -kv[1])))
    if device.type != "cuda":
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return {"total_ms": total / 1e3, "classes_ms": {c: us / 1e3 for c, us in classes.items()},
            "top": [(n, us / 1e3) for n, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]],
            "by_kind_ms": {k: {c: us / 1e3 for c, us in v.items()} for k, v in by_kind.items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", default="128K,256K")
    ap.add_argument("--profile-length", default="128K")
    ap.add_argument("--chunk", type=int, default=16384, help="the hybrid's prefill chunk (bench_model.py's default)")
    ap.add_argument("--hybrid-chunks", default="32K,64K", help="extra chunk sizes to time the fused hybrid with")
    ap.add_argument("--warmup", default="32K")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--models", default="dense,hybrid-eager,hybrid-fused",
                    help="also hybrid-srckv: the fused hybrid with the source's K/V heads in its Lightning layers")
    ap.add_argument("--out", default="profile-out")
    args = ap.parse_args()


    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = (out / "profile.txt").open("w")

    def log(s=""):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = [parse_length(x) for x in args.lengths.split(",") if x]
    plen = parse_length(args.profile_length)
    full = FULL_LAYERS.get(args.shape, args.layers)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"device {dev}, torch {torch.__version__}, shape {args.shape} with {args.layers} layers, dtype {dtype}")
    logits_seen: dict[int, torch.Tensor] = {}
    results: dict = {"device": dev, "torch": torch.__version__, "layers": args.layers, "models": {}}
    for which in [m for m in args.models.split(",") if m]:
        hybrid = which.startswith("hybrid")
        t0 = time.perf_counter()
        model = build(args.shape, args.layers, dtype, device, hybrid,
                      lightning_kv_heads="source" if which == "hybrid-srckv" else "query")
        if hybrid:
            model.config.fused_elementwise = which != "hybrid-eager"
        chunk = args.chunk if hybrid else 1 << 40  # the dense model: one pass (bench_model.py's one-pass mode)
        if hybrid:
            model.config.prefill_chunk_size = args.chunk
        else:
            use_chunked_sdpa(model)
        sync(device)
        log(f"\n=== {which}: built in {time.perf_counter() - t0:.1f} s; layer kinds "
            f"{[layer_kind(x) for x in decoder_layers(model)]}")
        timer = PartTimer(model, device)
        t0 = time.perf_counter()
        timed_prefill(model, parse_length(args.warmup), chunk, device)  # compilation, allocator growth
        log(f"  warm-up {args.warmup}: {time.perf_counter() - t0:.1f} s")
        res = {"ttft_s": {}, "parts_ms": {}, "chunks": {}}
        for L in lengths:
            try:
                dt, parts = timed_prefill(model, L, chunk, device, timer)
            except torch.OutOfMemoryError:
                log(f"  {format_length(L)}: OOM")
                torch.cuda.empty_cache()
                continue
            res["ttft_s"][format_length(L)] = dt
            if hybrid:  # the same random weights in both hybrid runs: fused and eager must agree
                ref = logits_seen.setdefault(L, timed_prefill.last_logits)
                if ref is not timed_prefill.last_logits:
                    rel = ((ref - timed_prefill.last_logits).norm() / ref.norm()).item()
                    log(f"  {format_length(L)}: last-position logits vs the first hybrid run: rel. diff {rel:.2e}")
                    res.setdefault("rel_diff_vs_first", {})[format_length(L)] = rel
            res["parts_ms"][format_length(L)] = parts
            n_kind = defaultdict(int)
            for x in decoder_layers(model):
                n_kind[layer_kind(x)] += 1
            log(f"  {format_length(L)}: wall {dt:.3f} s ({args.layers} layers + embedding/head)")
            est = 0.0
            for kind, p in parts.items():
                per = {k: v / n_kind[kind] for k, v in p.items()}
                n_full = full * n_kind[kind] // args.layers
                est += per["layer"] * n_full
                log(f"    {kind:17s} per layer: {per['layer']:8.1f} ms = mixer {per.get('mixer', 0):7.1f} + MLP "
                    f"{per.get('mlp', 0):7.1f} + norms/residual {per['other']:6.1f}   (x{n_full} in the full model)")
            log(f"    full {full}-layer model estimate from the per-layer times: {est / 1e3:.2f} s")
            res["full_estimate_s_" + format_length(L)] = est / 1e3
        if hybrid and which == "hybrid-fused":
            for c in [parse_length(x) for x in args.hybrid_chunks.split(",") if x]:
                model.config.prefill_chunk_size = c
                timed_prefill(model, max(c, parse_length(args.warmup)), c, device)
                for L in lengths:
                    try:
                        dt, _ = timed_prefill(model, L, c, device)
                    except torch.OutOfMemoryError:
                        log(f"  chunk {format_length(c)} {format_length(L)}: OOM")
                        torch.cuda.empty_cache()
                        continue
                    res["chunks"][f"{format_length(c)}@{format_length(L)}"] = dt
                    log(f"  chunk {format_length(c)}: {format_length(L)} wall {dt:.3f} s")
            model.config.prefill_chunk_size = args.chunk
        timer.remove()
        log(f"  profile of one {format_length(plen)} prefill:")
        res["profile"] = profile_prefill(model, plen, chunk, device, log, args.top)
        if device.type == "cuda":
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        results["models"][which] = res
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    log("\nsummary (wall TTFT s, this few-layer model):")
    for which, r in results["models"].items():
        log(f"  {which:14s} " + "  ".join(f"{k} {v:.3f}" for k, v in r["ttft_s"].items())
            + "  " + "  ".join(f"chunk {k} {v:.3f}" for k, v in r["chunks"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
