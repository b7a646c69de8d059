"""The score report: JSON for machines, a PNG bar chart for people."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_NAME = "report.json"
CHART_NAME = "scores.png"
STUDENTS_NAME = "students.safetensors"


def write_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def read_report(path: str | Path) -> dict:
    """A saved score report (a report.json file, or the folder `hybridize score` wrote)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give the report.json written by `hybridize score`")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a score report (invalid JSON: {e.msg})") from None
    for key in ("layers", "num_layers", "method"):
        if key not in report:
            raise ValueError(f"{path} is not a score report: the field {key!r} is missing")
    return report


def write_chart(report: dict, path: Path) -> None:
    """Bars: each layer's score; chosen (sparse) layers in a second colour, forced ones hatched. Below: the swap's
    loss increase and retrieval drop per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    idx = [e["layer"] for e in layers]
    chosen = set(report["chosen_layers"])
    forced = set(report.get("forced_layers", []))
    colors = ["tab:red" if i in chosen else "tab:gray" for i in idx]
    has_sweep = all(e.get("C") is not None for e in layers)
    fig, axes = plt.subplots(2 if has_sweep else 1, 1, figsize=(max(6, 0.32 * len(idx) + 2), 6 if has_sweep else 3.5),
                             squeeze=False)
    ax = axes[0][0]
    bars = ax.bar(idx, [e["score"] for e in layers], color=colors)
    for bar, i in zip(bars, idx):
        if i in forced:
            bar.set_hatch("//")
    ax.set_ylabel("score")
    ax.set_title(f"{report['method']} scores: {len(chosen)} sparse of {len(idx)} layers (red; hatched = forced)")
    ax.set_xticks(idx)
    ax.tick_params(axis="x", labelsize=7)
    if has_sweep:
        ax2 = axes[1][0]
        teacher = report["teacher"]
        w = 0.4
        ax2.bar([i - w / 2 for i in idx], [e["loss"] - teacher["loss"] for e in layers], w, label="loss increase")
        ax2.bar([i + w / 2 for i in idx], [teacher["R"] - e["R"] for e in layers], w, label="retrieval drop")
        ax2.set_xlabel("layer (swapped for its aligned Lightning student)")
        ax2.set_xticks(idx)
        ax2.tick_params(axis="x", labelsize=7)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
