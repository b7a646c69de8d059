"""Results as JSON, markdown tables (the hybrid and its source in adjacent columns) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..common import format_length

EVAL_JSON, EVAL_MD = "eval_results.json", "eval_results.md"
BENCH_JSON, BENCH_MD = "bench_results.json", "bench_results.md"
BENCH_PLOTS = ("bench_ttft.png", "bench_decode.png", "bench_memory.png")
RETRIEVAL_PNG = "retrieval_heatmap.png"
RETENTION_JSON, RETENTION_MD = "retention.json", "retention.md"
RETENTION_PLOTS = ("retention_retrieval.png", "retention_position.png")


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
# retention
# ---------------------------------------------------------------------------------------------------------------------
def _bucket(lo: int, hi: int) -> str:
    return f"{format_length(lo) if lo else '0'}-{format_length(hi)}"


SUMMARY_LABELS = {
    "heldout_ppl_ratio": "held-out perplexity / reference (geometric mean)",
    "probe_accuracy": "knowledge probes: accuracy",
    "probe_retained": "knowledge probes: accuracy where the reference is right",
    "probe_echo_rate": "knowledge probes: answers that repeat the prompt instead",
    "top1_agreement": "next-token top-1 agreement with the reference",
    "kl": "KL(reference || model), nats/token",
}


def _summary_label(key: str) -> str:
    if key in SUMMARY_LABELS:
        return SUMMARY_LABELS[key]
    task, _, what = key.partition("_")
    return f"{task}: {'choice accuracy' if what == 'choice_accuracy' else 'exact match'} (all lengths)"


def _frac(num, den) -> str:
    return f"{num / den:.2f} ({num}/{den})" if den else "-"


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (small n and rates near 0 or 1 included)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _counted(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} ({lo:.2f}-{hi:.2f})"


def retention_markdown(results: dict) -> str:
    """Tables of the retention report: summary, perplexity (and ratio to the reference) per source and window,
    retrieval by task x length, probes, agreement, NLL by position, timing, notes."""
    names = list(results["models"])
    ref = results["reference"]
    models = [results["models"][n] for n in names]
    others = [n for n in names if n != ref]
    out = [f"## Retention (reference: {ref})\n"]
    roles = ", ".join(f"{s} ({r})" for s, r in results["sources"].items())
    out.append(f"Sources: {roles}.\n")
    for train, per in results.get("overlap", {}).items():
        out.append(f"Held-out 13-gram overlap with {train}: "
                   + ", ".join(f"{s} {v:.4f}" for s, v in per.items()) + ".\n")

    keys = list(dict.fromkeys(k for m in models for k in m.get("summary", {})))
    if keys:
        out.append("\n### Summary\n\n" + _table(["measure"] + names,
                                                   [[_summary_label(k)] + [_fmt(m["summary"].get(k)) for m in models]
                                                    for k in keys]))

    rows = []
    sources = list(dict.fromkeys(s for m in models for s in m.get("perplexity", {})))
    for s in sources:
        windows = list(dict.fromkeys(w for m in models for w in m["perplexity"].get(s, {})))
        for w in windows:
            vals = [m["perplexity"].get(s, {}).get(w) for m in models]
            n = next(v for v in vals if v)
            rows.append([s, f"{format_length(int(w))} x {n['windows']}"]
                        + [_fmt(v["perplexity"], 4) if v else "-" for v in vals]
                        + [_fmt(results["models"][o]["perplexity"].get(s, {}).get(w, {}).get("ratio"), 3)
                           for o in others])
    if rows:
        out.append("\n### Perplexity\n\n" + _table(
            ["source", "window x count"] + names + [f"ratio ({o} / {ref})" for o in others], rows))

    retrieval = [m.get("retrieval", {}) for m in models]
    tasks = list(dict.fromkeys(t for r in retrieval for t in r))
    if tasks:
        rows = []
        for t in tasks:
            first = next(r[t] for r in retrieval if t in r)
            for L in first["by_length"]:
                cells = [r[t]["by_length"].get(L) if t in r else None for r in retrieval]
                rows.append([t, format_length(int(L)), str(first["by_length"][L]["n"])]
                            + [f"{c['accuracy']:.2f} / {c['choice_accuracy']:.2f}"
                               + ("" if c["n"] == first["by_length"][L]["n"] else f" (n={c['n']})") if c else "-"
                               for c in cells])
        chance = next(r[t]["chance"] for r in retrieval for t in r)
        out.append(f"\n### Retrieval\n\nGreedy exact match / likelihood choice (chance {chance:.2f}); n probes per "
                   "task and length (depths x trials).\n\n" + _table(["task", "length", "n"] + names, rows))
        totals = []
        for t in tasks:
            cells = []
            for r in retrieval:
                by = r[t]["by_length"].values() if t in r else []
                n = sum(c["n"] for c in by)
                k = sum(round(c["accuracy"] * c["n"]) for c in by)
                cells.append(_counted(k, n) if n else "-")
            totals.append([t] + cells)
        out.append("\nExact matches over all lengths, with 95% Wilson intervals: two runs whose intervals overlap "
                   "widely are not told apart by these probes.\n\n" + _table(["task"] + names, totals))
        misses = []
        for t in tasks:
            cells = []
            for r in retrieval:
                by = list(r[t]["by_length"].values()) if t in r else []
                wrong = sum(c["n"] - round(c["accuracy"] * c["n"]) for c in by)
                first_token = [c["first_token_misses"] for c in by if "first_token_misses" in c]
                cells.append(f"{sum(first_token)} of {wrong}" if len(first_token) == len(by) and by else "-")
            misses.append([t] + cells)
        out.append("\nGreedy misses that fail at the answer's first token (for a pass key the space before its "
                   "digits), of all misses: such a model may still copy the rest once the answer is begun.\n\n"
                   + _table(["task"] + names, misses))

    if any("probes" in m for m in models):
        p0 = results["models"][ref].get("probes", {})
        rows = [[f"all {p0.get('total', '-')} prompts"]
                + [_frac(m["probes"]["correct"], m["probes"]["total"]) if "probes" in m else "-" for m in models],
                [f"the {p0.get('retained_total', '-')} the reference answers"]
                + [_frac(m["probes"].get("retained_correct", 0), m["probes"].get("retained_total", 0))
                   if "probes" in m else "-" for m in models],
                ["answers that repeat the prompt instead (first content word from the prompt)"]
                + [str(m["probes"]["echoed"]) if "echoed" in m.get("probes", {}) else "-" for m in models]]
        cats = list(p0.get("by_category", {}))
        rows += [[f"{c} ({p0['by_category'][c]['total']})"]
                 + [_fmt(m["probes"]["by_category"][c]["accuracy"]) if "probes" in m else "-" for m in models]
                 for c in cats]
        out.append("\n### Knowledge probes\n\nGreedy completion starts with the answer.\n\n"
                   + _table(["prompts"] + names, rows))

    agree = list(dict.fromkeys(s for n in others for s in results["models"][n].get("agreement", {})))
    if agree:
        rows = []
        for s in agree:
            vals = [results["models"][n].get("agreement", {}).get(s) for n in others]
            tokens = next(v["tokens"] for v in vals if v)
            rows.append([s, str(tokens)] + [_fmt(v["top1"]) if v else "-" for v in vals]
                        + [_fmt(v["kl"]) if v else "-" for v in vals])
        out.append(f"\n### Agreement with {ref}\n\nNext-token top-1 agreement and mean KL({ref} || model) in "
                   "nats.\n\n" + _table(["source", "tokens"] + [f"top-1 ({n})" for n in others]
                                           + [f"KL ({n})" for n in others], rows))

    pos_sources = list(dict.fromkeys(s for m in models for s in m.get("position", {})))
    if pos_sources:
        rows = []
        for s in pos_sources:
            p = next(m["position"][s] for m in models if s in m.get("position", {}))
            for i in range(len(p["edges"]) - 1):
                rows.append([s, _bucket(p["edges"][i], p["edges"][i + 1])]
                            + [_fmt(m["position"][s]["nll"][i], 4) if s in m.get("position", {}) else "-"
                               for m in models])
        out.append("\n### NLL by position\n\nMean NLL (nats/token) of the predictions made in each position "
                   "bucket.\n\n" + _table(["source", "positions"] + names, rows))

    lm = {n: m["lm_eval"] for n, m in zip(names, models) if m.get("lm_eval")}
    if lm:
        out.append("\n### lm-evaluation-harness\n\n" + "\n".join(f"- **{n}**: {v}" for n, v in lm.items()) + "\n")
    sections = list(dict.fromkeys(k for m in models for k in m.get("seconds", {})))
    if sections:
        out.append("\n### Time (s)\n\n" + _table(["section"] + names, [[k] + [_fmt(m["seconds"].get(k)) for m in models]
                                                                         for k in sections]))
    if results.get("notes"):
        out.append("\n### Notes\n\n" + "\n".join(f"- {n}" for n in results["notes"]) + "\n")
    return "\n".join(out)


def plot_retention(results: dict, folder: str | Path) -> list[Path]:
    """retention_retrieval.png: accuracy vs length per task (solid: greedy, dashed: choice); retention_position.png:
    NLL vs position per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    paths = []
    models = results["models"]
    tasks = list(dict.fromkeys(t for m in models.values() for t in m.get("retrieval", {})))
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 3.4), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            for i, (name, m) in enumerate(models.items()):
                r = m.get("retrieval", {}).get(t)
                if r is None:
                    continue
                x = r["lengths"]
                color = f"C{i}"
                ax.plot(x, [r["by_length"][str(L)]["accuracy"] for L in x], marker="o", color=color, label=name)
                ax.plot(x, [r["by_length"][str(L)]["choice_accuracy"] for L in x], ls="--", marker=".", color=color)
                chance = r["chance"]
            ax.axhline(chance, color="gray", ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [format_length(L) for L in x])
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("context length (tokens)")
            ax.set_title(f"{t} (solid: exact, dashed: choice)", fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("accuracy")
        axes[0][0].legend(fontsize=8)
        paths.append(_save(fig, folder / RETENTION_PLOTS[0]))
    sources = list(dict.fromkeys(s for m in models.values() for s in m.get("position", {})))
    if sources:
        fig, axes = plt.subplots(1, len(sources), figsize=(4.8 * len(sources), 3.4), squeeze=False)
        for ax, s in zip(axes[0], sources):
            for name, m in models.items():
                p = m.get("position", {}).get(s)
                if p is None:
                    continue
                pts = [((lo + hi) / 2, v) for lo, hi, v in zip(p["edges"], p["edges"][1:], p["nll"]) if v is not None]
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(p["edges"][1:], [format_length(e) for e in p["edges"][1:]], fontsize=7)
            ax.set_xlabel("position (tokens; points at bucket middles)")
            ax.set_ylabel("mean NLL (nats/token)")
            ax.set_title(f"NLL by position: {s}", fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        paths.append(_save(fig, folder / RETENTION_PLOTS[1]))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def write_retention_report(results: dict, folder: str | Path, plots: bool = True) -> dict[str, Path]:
    """retention.json, retention.md and the plots in `folder`, each file replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": _write_text(folder / RETENTION_JSON, json.dumps(results, indent=2, default=str) + "\n"),
             "markdown": _write_text(folder / RETENTION_MD, retention_markdown(results))}
    if plots:
        try:
            for p in plot_retention(results, folder):
                paths[p.stem] = p
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
    "BENCH_JSON", "BENCH_MD", "BENCH_PLOTS", "EVAL_JSON", "EVAL_MD", "RETENTION_JSON", "RETENTION_MD",
    "RETENTION_PLOTS", "RETRIEVAL_PNG", "bench_table", "eval_table", "plot_bench", "plot_retention",
    "retention_markdown", "write_bench_report", "write_eval_report", "write_json", "write_retention_report",
]
