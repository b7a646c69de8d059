"""FLOP counts of `hybridize score` (SALA layer selection) for a model shape and settings, and the time they imply
at a given sustained FLOP rate. An estimate from arithmetic, not a measurement: calibrate the rate with a measured run
(`--measured report.json` prints the rate that run achieved, phase by phase).

    python bench/select_cost.py --measured layer-scores/report.json          # SmolLM2, CPU defaults, measured rate
    python bench/select_cost.py --model llama3-8b --gpu-defaults --tflops 200  # estimate for one GPU
"""

from __future__ import annotations

import argparse
import json

SHAPES = {
    # layers, hidden, heads, kv heads, head dim, intermediate, vocab
    "smollm2-135m": dict(L=30, h=576, H=9, Hkv=3, d=64, i=1536, V=49152),
    "llama3-8b": dict(L=32, h=4096, H=32, Hkv=8, d=128, i=14336, V=128256),
}


def layer_fwd(s: dict, ctx: float) -> float:
    """One teacher layer, one token, attending over `ctx` keys on average."""
    proj = 2 * s["h"] * (s["H"] * s["d"] * 2 + s["Hkv"] * s["d"] * 2)
    mlp = 2 * 3 * s["h"] * s["i"]
    attn = 2 * 2 * ctx * s["H"] * s["d"]
    return proj + mlp + attn


def student_fwd_bwd(s: dict, chunk: int = 64) -> float:
    """One Lightning student, one token, forward + backward (3x forward): q, k, v, o, z projections + chunked scan."""
    proj = 2 * 5 * s["h"] * s["H"] * s["d"]
    scan = 2 * 2 * chunk * s["H"] * s["d"] + 2 * 2 * s["d"] * s["d"] * s["H"]
    return 3 * (proj + scan)


def phases(s: dict, cfg: dict) -> dict[str, float]:
    L, head = s["L"], 2 * s["h"] * s["V"]
    align_tokens = cfg["align_steps"] * cfg["align_batch"] * cfg["seq_len"]
    align = align_tokens * (L * layer_fwd(s, cfg["seq_len"] / 2) + L * student_fwd_bwd(s))
    held = cfg["heldout_seqs"] * cfg["heldout_len"]
    probe_lengths = [n for n in cfg["passkey"] for _ in range(cfg["samples"])] + \
                    [n for n in cfg["kv"] for _ in range(cfg["samples"])]
    seqs = [(cfg["heldout_len"], cfg["heldout_seqs"])] + [(n, 1) for n in probe_lengths]
    teacher = sum(n * count * (L * layer_fwd(s, n / 2)) for n, count in seqs) + held * head
    # swap at layer i: layers i..L-1 run again -> L(L+1)/2 layer passes per token over the whole sweep
    sweep = sum(n * count * (L * (L + 1) / 2) * layer_fwd(s, n / 2) for n, count in seqs) + L * held * head
    comp = cfg["compare_seqs"] * cfg["heldout_len"] * 5 * (L * layer_fwd(s, cfg["heldout_len"] / 2) + head)
    return {"align": align, "teacher": teacher, "sweep": sweep, "compare": comp}


CPU = dict(align_steps=48, align_batch=2, seq_len=256, heldout_seqs=4, heldout_len=256, passkey=(256, 512),
           kv=(256, 512), samples=2, compare_seqs=8)
GPU = dict(align_steps=200, align_batch=8, seq_len=512, heldout_seqs=16, heldout_len=512, passkey=(512, 2048, 4096),
           kv=(512, 2048), samples=8, compare_seqs=32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--gpu-defaults", action="store_true")
    ap.add_argument("--tflops", type=float, default=None, help="assumed sustained TFLOP/s for the time estimate")
    ap.add_argument("--measured", default=None, help="report.json of a run with the same shape and settings")
    args = ap.parse_args()
    s, cfg = SHAPES[args.model], (GPU if args.gpu_defaults else CPU)
    flops = phases(s, cfg)
    timings = {}
    if args.measured:
        rep = json.load(open(args.measured))
        t = rep["timings"]
        timings = {"align": t.get("align_s"), "teacher": t.get("teacher_s"), "sweep": t.get("sweep_s"),
                   "compare": t.get("compare_s")}
    print(f"model {args.model}, {'GPU' if args.gpu_defaults else 'CPU'} defaults")
    print(f"{'phase':<10}{'TFLOP':>10}{'measured s':>12}{'GFLOP/s':>10}{'est. s':>10}")
    for k, f in flops.items():
        m = timings.get(k)
        rate = f"{f / m / 1e9:10.1f}" if m else f"{'':>10}"
        est = f"{f / (args.tflops * 1e12):10.1f}" if args.tflops else f"{'':>10}"
        measured = f"{m:12.1f}" if m else " " * 12
        print(f"{k:<10}{f / 1e12:10.2f}{measured}{rate}{est}")
    total = sum(flops.values())
    print(f"{'total':<10}{total / 1e12:10.2f}" + (f"{'':>22}{total / (args.tflops * 1e12):10.1f}" if args.tflops else ""))


if __name__ == "__main__":
    main()
