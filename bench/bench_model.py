"""Llama-3-8B-shaped model (random weights, bf16) vs its 1:3 hybrid on one GPU: time to first token, decode
tokens/s and peak memory over context lengths, OOM recorded as a result.

    python bench/bench_model.py --out OUT [--budget 380] [--lengths 16K,32K,64K,128K,256K,512K,1M]

Both models are built directly on the GPU, one at a time (the dense model first). Each length is prefilled in chunks
of 16K tokens (batch 1); decode runs from that cache copied to batches 1, 2 and 8. The dense model also runs in
`one-pass` mode (`--dense-modes`): the whole prompt in one forward, its attention a plain causal SDPA call (PyTorch's
default backend), the fastest prefill a dense transformers model has where memory allows; the chunked mode's later
chunks need a lower-right causal mask, which only the slower FlashAttention-2 path of SDPA takes. The last table
compares each hybrid with the faster dense mode at each length. Before its timed lengths each model prefills once,
untimed, at its longest length (`--warmup`, at most `--warmup-cap`): kernel compilation (Triton specialises the sparse
selection kernels per power of two of the key-block count; torch.compile builds the hybrid's fused elementwise pieces)
then stays out of the timings. Variant `block-eager` is the default hybrid with those fused pieces off (the model code
before they existed), for before/after comparisons in one run. Lengths are tried in increasing order;
a model stops growing at its first OOM, and a length whose predicted time would pass the model's share of the time
budget is recorded as skipped. Every result is appended to OUT/results.jsonl as soon as it exists (a killed run keeps
what it measured); OUT/bench_results.{json,md} hold the final report (plots: `python bench/bench_model.py --plot OUT`
where matplotlib is installed).

Per-model plans (issue 18: one run for prefill, 2M tokens and decode at the largest batch): `--lengths-of
one-pass=128K,256K` gives a model its own lengths (one-pass, chunked: the dense modes; hybrid: every hybrid variant);
`--decode-at hybrid:128K=8,16,24,32` its own decode batches at one length (increasing; the first out of memory ends
the list, so the last that ran is the largest batch that fits; the one-pass dense model decodes only where named);
`--fit-search` bisects, right after each model is built, the longest context whose cache and one chunk's activations
can be allocated beside its weights (`largest_fitting_length`, an allocation probe in --chunk steps, not a prefill)
into OUT/fit.json. A model's time cap counts from its build (warm-up included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hybridize.common import format_length
from hybridize.eval.report import plot_bench, write_bench_report
from hybridize.eval.speed import (WARMUP_CAP, BenchReport, bench_model, device_name, largest_fitting_length,
                                  parse_length, shape_builders)
from portable import without_machine_paths  # bench/portable.py (the script's folder is on sys.path)


def kernel_dispatch() -> dict:
    from hybridize.arch import ops

    return {"lightning_triton": bool(getattr(ops, "_LIGHTNING_TRITON", False)),
            "sparse_triton": bool(getattr(ops, "_SPARSE_TRITON", False))}


def report_from_jsonl(folder: Path, args) -> dict:
    info = json.loads((folder / "info.json").read_text())
    models: dict[str, dict] = {}
    for line in (folder / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = row.pop("model")
        m = models.setdefault(name, {"name": name, "kind": "dense" if name.endswith("(dense)") else "hybrid",
                                     "params": None, "results": []})
        m["results"].append(row)
    lengths = sorted({r["length"] for m in models.values() for r in m["results"]})
    return {"device": info["device"], "dtype": "bfloat16", "chunk_size": args.chunk, "decode_steps": args.decode_steps,
            "decode_batches": sorted(int(b) for b in args.decode_batches.split(",") if b.strip()), "lengths": lengths,
            "models": list(models.values()), "command": "(rebuilt from results.jsonl of a run cut short)", "date": "",
            "kernels": info.get("kernels")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--lengths", default="16K,32K,64K,128K,256K,512K,1M")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--decode-batches", default="1,2,8")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--budget", type=float, default=380.0, help="seconds for the whole script")
    ap.add_argument("--dense-share", type=float, default=0.4, help="share of the time left kept for the dense model")
    ap.add_argument("--warmup", default="max",
                    help="untimed warm-up prefill length per model ('max': the longest length it runs, at most "
                         "--warmup-cap). Triton compiles a selection-kernel variant per power of two of the key-block "
                         "count, so a short warm-up leaves compilations inside the timed prefills of longer contexts")
    ap.add_argument("--warmup-cap", default=format_length(WARMUP_CAP), help="longest 'max' warm-up")
    ap.add_argument("--variants", default="block,token,block+exact",
                    help="hybrid sparse-selection variants to run, in order (block is the config default); "
                         "NAME@LEN prefills that variant in chunks of LEN tokens instead of --chunk (e.g. block@64K)")
    ap.add_argument("--token-max", default="128K", help="longest length for the exact token-selection hybrid")
    ap.add_argument("--dense-modes", default="chunked,one-pass",
                    help="dense prefill modes: chunked (--chunk tokens at a time), one-pass (no decode timing)")
    ap.add_argument("--lengths-of", action="append", default=[], metavar="MODEL=LENGTHS",
                    help="lengths of one model instead of --lengths (MODEL: one-pass, chunked or hybrid; repeat)")
    ap.add_argument("--decode-at", action="append", default=[], metavar="MODEL:LENGTH=BATCHES",
                    help="decode batches of MODEL at LENGTH instead of --decode-batches, e.g. hybrid:128K=8,16,24 "
                         "(increasing; the first out of memory ends the list; repeat)")
    ap.add_argument("--dense-warmup", default=None, help="warm-up length of the dense models (default: --warmup); "
                    "a dense model compiles no Triton kernels, so a short one does")
    ap.add_argument("--dense-decode-warmup", type=int, default=None,
                    help="untimed decode steps per batch of the dense models (default: as the hybrids, 17: a Triton "
                         "variant per divisibility of the cache length by 16, which the dense models do not have)")
    ap.add_argument("--fit-search", action="store_true",
                    help="bisect each model's longest context whose cache + one chunk fits (OUT/fit.json)")
    ap.add_argument("--plot", default=None, help="only draw the plots of an earlier OUT folder")
    args = ap.parse_args()
    if args.plot:
        folder = Path(args.plot)
        if (folder / "bench_results.json").is_file():
            report = json.loads((folder / "bench_results.json").read_text())
        else:  # a run cut short: rebuild the report from the streamed results
            report = report_from_jsonl(folder, args)
        write_bench_report(report, folder, plots=False)
        for p in plot_bench(report, folder):
            print("wrote", p)
        print((folder / "bench_results.md").read_text() if (folder / "bench_results.md").is_file() else "")
        return 0

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    batches = tuple(int(b) for b in args.decode_batches.split(",") if b.strip())
    lengths_of, decode_at = parse_plans(args.lengths_of, args.decode_at)
    info = {"device": device_name(device), "torch": torch.__version__, "kernels": kernel_dispatch(),
            "total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else None}
    print(json.dumps(info), flush=True)
    (out / "info.json").write_text(json.dumps(info, indent=1))
    jsonl = (out / "results.jsonl").open("a")

    def on_result(name, r):
        jsonl.write(json.dumps({"model": name, **asdict(r)}) + "\n")
        jsonl.flush()

    known = {"block": {"sparse_selection": "block"},  # the config default (coarse normaliser since 2026-11-26 22:10)
             "token": {"sparse_selection": "token"},  # exact per-token selection
             "block+coarse": {"sparse_selection": "block", "sparse_coarse_normalizer": True},
             "block+exact": {"sparse_selection": "block", "sparse_coarse_normalizer": False},
             # the default hybrid with the fused elementwise pieces off (the code before they existed; no decode)
             "block-eager": {"sparse_selection": "block"}}
    chosen = [v for v in args.variants.split(",") if v]
    bad = [v for v in chosen if v.partition("@")[0] not in known]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {sorted(known)} (optionally @LEN)")
    variants = {f"({v} selection)": known[v.partition("@")[0]] for v in chosen}
    chunk_of = {f"({v} selection)": parse_length(v.partition("@")[2]) for v in chosen if "@" in v}
    builders = shape_builders(args.shape, "1:3", torch.bfloat16, device, variants)
    modes = [m for m in args.dense_modes.split(",") if m]
    if not modes or any(m not in ("chunked", "one-pass") for m in modes):
        raise SystemExit(f"--dense-modes: choose from chunked, one-pass; got {args.dense_modes!r}")
    dense_name = next(n for n in builders if n.endswith("(dense)"))
    dense_build = builders.pop(dense_name)
    one_pass = dense_name.replace(" (dense)", " one-pass (dense)")
    for mode in modes:
        builders[dense_name if mode == "chunked" else one_pass] = dense_build
    # The dense model first: its times are predictable, and a hybrid run cut short still leaves both in results.jsonl.
    names = sorted(builders, key=lambda n: not n.endswith("(dense)"))
    n_dense = len(modes)
    shares = [args.dense_share / n_dense / (1 - args.dense_share * i / n_dense) for i in range(n_dense)]
    shares += [0.7] * (len(names) - n_dense - 1) + [1.0]
    models, fits = [], {}
    for i, name in enumerate(names):
        left = args.budget - (time.perf_counter() - t_start)
        cap = left * shares[i] if i < len(names) - 1 else left - 15.0
        role = "one-pass" if name == one_pass else "chunked" if name == dense_name else "hybrid"
        model_lengths = lengths_of.get(role, lengths)
        if "token" in name:
            model_lengths = [L for L in model_lengths if L <= parse_length(args.token_max)]
        eager = "block-eager" in name
        chunk = next((c for suffix, c in chunk_of.items() if name.endswith(suffix)), args.chunk)
        t0 = time.perf_counter()
        model = builders[name]()
        if eager:
            model.config.fused_elementwise = False
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{name}: built in {time.perf_counter() - t0:.1f} s, "
              f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
              f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB; time cap {cap:.0f} s (from the build, warm-up "
              f"included)", flush=True)
        if args.fit_search:  # first, on a GPU that holds only the weights
            t1 = time.perf_counter()
            fits[name] = largest_fitting_length(model, device, args.chunk)
            print(f"{name}: longest context whose cache + one {args.chunk}-token chunk can be allocated: "
                  f"{fits[name]} tokens ({format_length(fits[name])}; probe {time.perf_counter() - t1:.1f} s)",
                  flush=True)
            (out / "fit.json").write_text(json.dumps({"chunk": args.chunk, "total_gib": info["total_gib"],
                                                      "fit_tokens": fits}, indent=1))
        warm = args.dense_warmup if role != "hybrid" and args.dense_warmup else args.warmup
        warmup = (min(max(model_lengths), parse_length(args.warmup_cap)) if warm == "max" else parse_length(warm))
        extra = {}
        if role != "hybrid" and args.dense_decode_warmup is not None:
            extra["decode_warmup_steps"] = args.dense_decode_warmup
        models.append(bench_model(name, model, model_lengths,
                                  chunk_size=1 << 40 if name == one_pass else chunk,  # one-pass: one chunk, the prompt
                                  decode_batches=() if name == one_pass or eager else batches,
                                  decode_steps=args.decode_steps, time_cap_s=cap, cap_from=t0,
                                  warmup_length=warmup, decode_at=None if eager else decode_at.get(role),
                                  **extra,
                                  log=lambda s: print(s, flush=True), on_result=on_result))
        del model
        torch.cuda.empty_cache()
    lengths = sorted({L for m in models for L in (r.length for r in m.results)} | set(lengths))
    batches = sorted({b for m in models for r in m.results for b in r.decode_tok_s} | set(batches))
    report = BenchReport(device_name(device), "bfloat16", args.chunk, args.decode_steps, batches, lengths,
                         models, without_machine_paths("python bench/bench_model.py " + " ".join(sys.argv[1:])),
                         time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())).to_dict()
    report["kernels"] = info["kernels"]
    paths = write_bench_report(report, out, plots=True)
    print((out / "bench_results.md").read_text())
    print("wrote", ", ".join(str(p) for p in paths.values()))
    for name, m in zip(names, models):
        for r in m.results:
            if r.status == "ok":
                continue
            print(f"{name} {format_length(r.length)}: {r.status} ({r.note})")
    print(fair_table(report))
    return 0


def parse_plans(lengths_of: list[str], decode_at: list[str]) -> tuple[dict, dict]:
    """--lengths-of MODEL=L,L and --decode-at MODEL:LEN=B,B -> ({model: [lengths]}, {model: {length: (batches)}})."""
    roles = ("one-pass", "chunked", "hybrid")
    lens: dict[str, list[int]] = {}
    for spec in lengths_of:
        role, _, text = spec.partition("=")
        if role not in roles or not text:
            raise SystemExit(f"--lengths-of: expected MODEL=LENGTHS with MODEL in {roles}, got {spec!r}")
        lens[role] = [parse_length(x) for x in text.split(",") if x.strip()]
    dec: dict[str, dict[int, tuple[int, ...]]] = {}
    for spec in decode_at:
        head, _, text = spec.partition("=")
        role, _, length = head.partition(":")
        if role not in roles or not length:
            raise SystemExit(f"--decode-at: expected MODEL:LENGTH=BATCHES with MODEL in {roles}, got {spec!r}")
        dec.setdefault(role, {})[parse_length(length)] = tuple(sorted(int(b) for b in text.split(",") if b.strip()))
    return lens, dec


def fair_table(report: dict) -> str:
    """TTFT of every model per length and each hybrid's speed-up over the FASTER dense mode measured there."""
    def ttft(m, L):
        r = next((r for r in m["results"] if r["length"] == L), None)
        return None if r is None else (r["ttft_s"] if r["status"] == "ok" else r["status"])

    dense = [m for m in report["models"] if m["kind"] == "dense"]
    hybrids = [m for m in report["models"] if m["kind"] != "dense"]
    head = ["context"] + [f"{m['name']} TTFT s" for m in dense + hybrids] + [f"speed-up {m['name']}" for m in hybrids]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for L in report["lengths"]:
        d = [ttft(m, L) for m in dense]
        best = min((x for x in d if isinstance(x, float)), default=None)
        h = [ttft(m, L) for m in hybrids]
        cells = [format_length(L)] + [f"{x:.2f}" if isinstance(x, float) else str(x or "-") for x in d + h]
        cells += [f"{best / x:.2f}x" if best and isinstance(x, float) else "-" for x in h]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
