"""How much of the source's prediction survives when the layers a 1:3 conversion makes linear see only a short
window of softmax attention, with no training at all.

The trained hybrids lose most at short range (held-out perplexity 1.31-1.75x the source's at 512-token windows) and
answer short factual prompts by repeating them. This measures the other end: the source itself with its attention cut
to the last W tokens in the linear layers (the sparse layers keep full attention), which is what a softmax window
inside the Lightning layers would give before any training.

    python bench/local_window.py [--windows 16 64 256] [--sparse-layers 0,4,5,7,15,17,21,29] [--seq-lens 512 2048]
        [--max-windows 4] [--sources wiki news pydoc] [--retrieval passkey --lengths 1024 2048 4096] [--out results.json]

With --retrieval, the retention report's retrieval probes (greedy exact match, 3 depths x --trials) instead of
perplexity: past the window, only the layers with full attention can read a needle.

CPU is enough (SmolLM2-135M, the built-in default model). Prints one row per window and source.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

WINDOWED = "hybridize_local_window"


def windowed_sdpa(windows: dict[int, int], sinks: int = 0):
    """A transformers attention function: causal SDPA, limited to the last `windows[layer]` keys in those layers and
    the first `sinks` keys of the sequence (the attention sinks most of a layer's heads park their weight on)."""

    from hybridize.kernels.window_reference import expand_heads, window_mask

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        key, value = expand_heads(query, key, value)
        tq, tk = query.shape[2], key.shape[2]
        # a layer without a window reads every earlier key: a window as long as the keys
        allowed = window_mask(tq, tk, windows.get(module.layer_idx) or tk, sinks, query.device)
        o = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
        return o.transpose(1, 2).contiguous(), None

    return attend


def set_windows(model, windows: dict[int, int], sinks: int = 0) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(WINDOWED, windowed_sdpa(windows, sinks))
    AttentionMaskInterface.register(WINDOWED, lambda *a, **k: None)
    model.set_attn_implementation(WINDOWED)


def main(argv=None) -> dict:
    from hybridize.eval.loading import load_model
    from hybridize.eval.perplexity import perplexity

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--windows", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--sparse-layers", default="0,4,5,7,15,17,21,29",
                   help="layers that keep full attention (default: the retention recipe's SALA layers for SmolLM2)")
    p.add_argument("--sinks", type=int, nargs="+", default=[0, 4],
                   help="first tokens every windowed query also reads (StreamingLLM's attention sinks)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--sources", nargs="+", default=["wiki", "news", "pydoc"])
    p.add_argument("--retrieval", nargs="*", default=None, help="tasks (passkey, multikey, kv) instead of perplexity")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    loaded = load_model(args.model, dtype=torch.float32, device="cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    keep = {int(x) for x in args.sparse_layers.split(",")}
    linear = [i for i in range(model.config.num_hidden_layers) if i not in keep]
    rows = []
    settings = [(0, 0)] + [(w, k) for w in args.windows for k in args.sinks]  # (0, 0): the source as it is
    if args.retrieval is not None:
        return _retrieval(model, tok, linear, keep, settings, args)
    for window, sinks in settings:
        set_windows(model, {i: window for i in linear} if window else {}, sinks)
        for source in args.sources:
            for n in args.seq_lens:
                t = time.perf_counter()
                with torch.no_grad():
                    r = perplexity(model, tok, source, n, max_windows=args.max_windows, chunk_size=n)
                rows.append({"window": window, "sinks": sinks, "source": source, "seq_len": n, "perplexity": r.perplexity,
                             "tokens": r.tokens, "seconds": time.perf_counter() - t})
                print(json.dumps(rows[-1]), flush=True)
    base = {(r["source"], r["seq_len"]): r["perplexity"] for r in rows if r["window"] == 0}
    for r in rows:
        r["ratio"] = r["perplexity"] / base[(r["source"], r["seq_len"])]
    print(f"\n| window + sinks in the {len(linear)} linear layers | " + " | ".join(
        f"{s} {n}" for s in args.sources for n in args.seq_lens) + " | geometric mean ratio |")
    for window, sinks in settings:
        mine = [r for r in rows if (r["window"], r["sinks"]) == (window, sinks)]
        gm = math.exp(sum(math.log(r["ratio"]) for r in mine) / len(mine))
        print(f"| {f'{window} + {sinks}' if window else 'full (the source)'} | " + " | ".join(
            f"{r['perplexity']:.2f} ({r['ratio']:.2f}x)" for r in mine) + f" | {gm:.3f} |")
    return _written({"model": args.model, "sparse_layers": sorted(keep), "rows": rows, "torch": torch.__version__},
                    args.out)


def _written(result: dict, out: str | None) -> dict:
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _retrieval(model, tok, linear, keep, settings, args) -> dict:
    from hybridize.eval.retention import RetentionSettings
    from hybridize.eval.retrieval import run_retrieval

    report = RetentionSettings()  # the report's depths, choices, needles and digits
    rows = []
    for window, sinks in settings:
        set_windows(model, {i: window for i in linear} if window else {}, sinks)
        for task in args.retrieval or ["passkey"]:
            t = time.perf_counter()
            with torch.no_grad():
                r = run_retrieval(model, tok, task, args.lengths, report.depths, trials=args.trials,
                                  choices=report.choices, needles=report.needles, digits=report.digits)
            by_length = [sum(row) / len(row) for row in r.grid]
            rows.append({"window": window, "sinks": sinks, "task": task, "lengths": list(args.lengths),
                         "exact_by_length": by_length, "exact": r.accuracy, "choice": r.choice_accuracy,
                         "probes": len(r.probes), "seconds": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| window + sinks in the {len(linear)} linear layers | task | "
          + " | ".join(str(n) for n in args.lengths) + " | all |")
    for r in rows:
        name = f"{r['window']} + {r['sinks']}" if r["window"] else "full (the source)"
        print(f"| {name} | {r['task']} | " + " | ".join(f"{x:.2f}" for x in r["exact_by_length"])
              + f" | {r['exact']:.2f} |")
    return _written({"model": args.model, "sparse_layers": sorted(keep), "retrieval": rows, "torch": torch.__version__},
                    args.out)


if __name__ == "__main__":
    main()
