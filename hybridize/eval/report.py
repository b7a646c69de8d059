"""Results as JSON, markdown tables (the hybrid and its source in adjacent columns) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from .speed import format_length

EVAL_JSON, EVAL_MD = "eval_results.json", "eval_results.md"
BENCH_JSON, BENCH_MD = "bench_results.json", "bench_results.md"
BENCH_PLOTS = ("bench_ttft.png", "bench_decode.png", "bench_memory.png")
RETRIEVAL_PNG = "retrieval_heatmap.png"


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------------
def eval_table(results: dict) -> str:
    """`results` = {"models": {name: {...}}}: one row per metric, one column per model (the hybrid first)."""
    names = list(results["models"])
    models = [results["models"][n] for n in names]
    rows: list[list[str]] = []
    first = models[0]
    for i, ppl in enumerate(first.get("perplexity", [])):
        label = f"perplexity ({ppl['source']}, {ppl['seq_len']} tokens x {ppl['windows']})"
        rows.append([label] + [_fmt(m["perplexity"][i]["perplexity"], 4) if len(m.get("perplexity", [])) > i else "-"
                               for m in models])
    if first.get("retrieval"):
        r0 = first["retrieval"]
        rows.append(["pass key accuracy (greedy, all)"] + [_fmt(m["retrieval"]["accuracy"]) for m in models])
        rows.append([f"pass key choice accuracy (1 of {r0['choices']}, chance {r0['chance']:.2f})"]
                    + [_fmt(m["retrieval"]["choice_accuracy"]) for m in models])
        for li, L in enumerate(r0["lengths"]):
            rows.append([f"pass key accuracy @ {format_length(L)}"]
                        + [_fmt(sum(m["retrieval"]["grid"][li]) / len(m["retrieval"]["grid"][li])) for m in models])
    return _table(["metric"] + names, rows)


def samples_markdown(results: dict) -> str:
    out = []
    for name, m in results["models"].items():
        for s in m.get("samples", []):
            out.append(f"- **{name}** · _{s['prompt']}_ → {s['completion']!r}")
    return "\n".join(out) + ("\n" if out else "")


def write_eval_report(results: dict, folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    paths = {"json": write_json(results, folder / EVAL_JSON)}
    md = "## Evaluation\n\n" + eval_table(results)
    samples = samples_markdown(results)
    if samples:
        md += "\n### Samples\n\n" + samples
    (folder / EVAL_MD).write_text(md)
    paths["markdown"] = folder / EVAL_MD
    retrieval = {n: m["retrieval"] for n, m in results["models"].items() if m.get("retrieval")}
    if retrieval:
        from .retrieval import plot_heatmap

        try:
            paths["heatmap"] = plot_heatmap(retrieval, folder / RETRIEVAL_PNG)
        except ImportError:  # matplotlib missing: tables and JSON only
            pass
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------------
def _by_length(model: dict) -> dict[int, dict]:
    return {int(r["length"]): r for r in model["results"]}


def _decode(r: dict | None, batch: int):
    if r is None:
        return None
    if r["status"] != "ok":
        return r["status"]
    v = r["decode_tok_s"].get(batch, r["decode_tok_s"].get(str(batch)))
    return v


def _ratio(a, b) -> str:
    """a / b; for TTFT called as (source, hybrid), for decode as (hybrid, source)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return f"{a / b:.2f}x"
    if a == "oom" and isinstance(b, (int, float)) or isinstance(a, (int, float)) and b == "oom":
        return "source OOM"
    return "-"


def bench_table(report: dict) -> str:
    """Rows: context lengths. Columns: each metric for every model side by side (hybrids first), then each hybrid's
    ratio to the source when there is one dense model: TTFT speed-up (source / hybrid), decode ratio (hybrid / source)."""
    models = sorted(report["models"], key=lambda m: m.get("kind") != "hybrid")  # the hybrid first: ratios vs source
    names = [m["name"] for m in models]
    tables = [_by_length(m) for m in models]
    dense = [i for i, m in enumerate(models) if m.get("kind") == "dense"]
    src = dense[0] if len(dense) == 1 and len(models) > 1 else None
    hybrids = [i for i in range(len(models)) if i != src] if src is not None else []
    many = len(hybrids) > 1

    def ratio_names(what):
        return [f"{what}" + (f" ({names[i]})" if many else "") for i in hybrids]

    header = ["context"]
    header += [f"TTFT s ({n})" for n in names] + ratio_names("TTFT speed-up")
    for b in report["decode_batches"]:
        header += [f"decode tok/s B={b} ({n})" for n in names] + ratio_names(f"decode ratio B={b}")
    header += [f"peak GiB ({n})" for n in names]

    def ttft(r):
        if r is None:
            return None
        return r["ttft_s"] if r["status"] == "ok" else r["status"]

    rows = []
    for L in report["lengths"]:
        rs = [t.get(L) for t in tables]
        row = [format_length(L)]
        vals = [ttft(r) for r in rs]
        row += [_fmt(v) for v in vals] + [_ratio(vals[src], vals[i]) if vals[i] is not None else "-" for i in hybrids]
        for b in report["decode_batches"]:
            dv = [_decode(r, b) for r in rs]
            row += [_fmt(v) for v in dv] + [_ratio(dv[i], dv[src]) for i in hybrids]
        row += [_fmt(r["peak_gib"]) if r is not None and r.get("peak_gib") is not None else "-" for r in rs]
        rows.append(row)
    return _table(header, rows)


def bench_header(report: dict) -> str:
    return (f"device: {report['device']}, dtype {report['dtype']}, prefill chunk {report['chunk_size']} tokens, "
            f"decode {report['decode_steps']} steps, date {report.get('date', '')}\n")


def plot_bench(report: dict, folder: str | Path) -> list[Path]:
    """Log-log plots vs length: time to first token, decode tokens/s (largest batch) and peak memory (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batches = report["decode_batches"]
    specs = [
        ("bench_ttft.png", "time to first token (s)", lambda r: r["ttft_s"] if r["status"] == "ok" else None),
        ("bench_decode.png", f"decode tokens/s (batch {batches[-1]})",
         lambda r: _decode(r, batches[-1]) if isinstance(_decode(r, batches[-1]), float) else None),
        ("bench_memory.png", "peak GPU memory (GiB)", lambda r: r.get("peak_gib") if r["status"] == "ok" else None),
    ]
    paths = []
    for fname, ylabel, get in specs:
        if not any(isinstance(get(r), (int, float)) for m in report["models"] for r in m["results"]):
            continue  # e.g. no GPU memory figures on the CPU
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        any_point = False
        for m in report["models"]:
            pts = [(r["length"], get(r)) for r in m["results"]]
            pts = [(x, y) for x, y in pts if isinstance(y, (int, float)) and y > 0]
            line = None
            if pts:
                any_point = True
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m["name"])
            ooms = [r["length"] for r in m["results"] if r["status"] == "oom"
                    or (fname == "bench_decode.png" and _decode(r, batches[-1]) == "oom")]
            for x in ooms[:1]:
                ax.axvline(x, ls=":", color=line.get_color() if line is not None else "gray")
                ax.annotate(f"{m['name']}: OOM", (x, 0.5), xycoords=("data", "axes fraction"), rotation=90,
                            fontsize=7, ha="right", va="center")
        ax.set_xscale("log", base=2)
        if any_point:
            ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(report["lengths"], [format_length(n) for n in report["lengths"]])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{ylabel} — {report['device']}", fontsize=9)
        path = folder / fname
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def write_bench_report(report: dict, folder: str | Path, plots: bool = True) -> dict[str, Path]:
    folder = Path(folder)
    paths = {"json": write_json(report, folder / BENCH_JSON)}
    md = "## Speed\n\n" + bench_header(report) + "\n" + bench_table(report)
    (folder / BENCH_MD).write_text(md)
    paths["markdown"] = folder / BENCH_MD
    if plots:
        try:
            for p in plot_bench(report, folder):
                paths[p.stem] = p
        except ImportError:  # matplotlib missing (e.g. a bare GPU node): tables and JSON only
            pass
    return paths


__all__ = [
    "BENCH_JSON", "BENCH_MD", "BENCH_PLOTS", "EVAL_JSON", "EVAL_MD", "RETRIEVAL_PNG", "bench_table", "eval_table",
    "plot_bench", "write_bench_report", "write_eval_report", "write_json",
]
