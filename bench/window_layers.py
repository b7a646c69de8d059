"""Which layers the source retrieves with when the others see only a window: fresh windowed conversions, no training.

Each Lightning layer of a fresh conversion with `lightning_window` is exactly its source attention over the first
sinks and last W tokens (the recurrent branch starts at zero), so these numbers are the source's own, with its
attention cut in the layers a 1:3 hybrid makes linear (RoPE kept in the others: `hype=False`).

    python bench/window_layers.py cut-each [--window 256]
        every layer cut alone: the answer log-probability per token of 5 probes at 1,024 tokens (3 pass-key, 2
        key-value; the retention report's probe format) and their greedy exact matches
    python bench/window_layers.py keep 0,4,5,7,15,17,21,29 4,7,14,18,20,21,22,23 [--hype] [--window 256]
        each list kept whole and every other layer cut: the same answer log-probability, pass-key and multi-key exact
        at 1K / 4K (depths 0.1 / 0.5, 2 trials: the training's stage-end measure) and held-out perplexity at 512
        (4 windows per source), with the source's perplexity last

    python bench/window_layers.py long 4,7,14,18,20,21,22,23 [--yarn 4 [--yarn-whole]] [--sink-reach N] [--lengths 8192,16384]
        the source, then each list kept whole (dense at every length) and the rest cut: the pass-key's answer
        log-probability per token and exact matches (depths 0.1 / 0.5 / 0.9) past the source's context, held-out
        perplexity at 512; --yarn F (the source row left out) rescales RoPE YaRN-style by F over the source's
        context (the cut layers see 260 positions, where YaRN leaves the fast dimensions as they were)

CPU is enough (SmolLM2-135M, the built-in default model; 2 cores: about 7 s per model for cut-each, 2.5 min per list
for keep). Prints one line per model; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from hybridize.convert.build import build_hybrid
from hybridize.convert.source import open_source
from hybridize.eval.perplexity import perplexity
from hybridize.eval.retrieval import make_probe, run_retrieval, score_candidates

SOURCES = ("news", "wiki", "pydoc")


def probe_set(tok, length: int = 1024, seed: int = 1):
    rng = random.Random(seed)
    return ([make_probe("passkey", tok, length, d, rng) for d in (0.1, 0.3, 0.5)]
            + [make_probe("kv", tok, length, d, rng) for d in (0.2, 0.4)])


def answers(model, probes) -> tuple[float, int]:
    """Mean answer log-probability per token, and greedy exact matches."""
    lps, exact = [], 0
    for p in probes:
        logp, greedy, _ = score_candidates(model, p.prompt, p.candidates[:1])
        lps.append(float(logp[0]) / len(p.candidates[0]))
        exact += bool(greedy[0])
    return sum(lps) / len(lps), exact


def hybrid(src, whole: set[int], window: int, hype: bool, **options):
    L = src.config.num_hidden_layers
    return build_hybrid(src, ["sparse" if i in whole else "lightning" for i in range(L)], hype=hype,
                        lightning_window=window, lightning_sinks=4, **options)


def yarn_in_whole_layers(model, factor: float) -> None:
    """RoPE rescaled YaRN-style by `factor` (convert's `rope_yarn`) in the full-attention layers alone: each gets the
    YaRN tables in place of the model's."""
    import copy
    import dataclasses

    from hybridize.arch.modeling_hybridize import HybridRotaryEmbedding
    from hybridize.convert.build import yarn_rope

    c = copy.deepcopy(model.config)
    c.rope_parameters, c.max_position_embeddings = yarn_rope(c.rope_parameters, c.max_position_embeddings, factor)
    rotary = HybridRotaryEmbedding(c)
    for layer, kind in zip(model.model.layers, model.config.layer_types):
        if kind != "full_attention":
            continue
        attn = layer.self_attn
        forward = attn.forward

        def patched(x, ctx, *a, _forward=forward, **kw):
            cos, sin = rotary(ctx.position_ids)
            return _forward(x, dataclasses.replace(ctx, cos=cos.to(ctx.cos.dtype), sin=sin.to(ctx.sin.dtype)), *a,
                            **kw)
        attn.forward = patched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["cut-each", "keep", "long"])
    ap.add_argument("layers", nargs="*", help="keep: comma-separated layer lists")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--hype", action="store_true", help="keep: the kept layers NoPE (HyPE), as convert's default")
    ap.add_argument("--yarn", type=float, default=None, help="long: YaRN factor over the source's context")
    ap.add_argument("--yarn-whole", action="store_true",
                    help="long: --yarn in the kept layers only (the cut layers keep the source's RoPE)")
    ap.add_argument("--lengths", default="8192,16384", help="long: pass-key lengths")
    ap.add_argument("--sink-reach", type=int, default=None,
                    help="long: the window branch's lightning_sink_reach (default: the conversion's, the source's "
                         "context; 0: sinks read at their true distance, as before 2026-12-03's sixteenth session)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src, tok, _ = open_source("default", torch.float32)
    L = src.config.num_hidden_layers
    probes = probe_set(tok)
    rows = [{"model": "source", "answer_logp": answers(src, probes)}]
    print(rows[-1], flush=True)
    if args.mode == "cut-each":
        for i in range(L):
            rows.append({"model": f"cut {i}", "answer_logp": answers(hybrid(src, set(range(L)) - {i}, args.window,
                                                                           False), probes)})
            print(rows[-1], flush=True)
    elif args.mode == "long":
        lengths = tuple(int(n) for n in args.lengths.split(","))
        rng = random.Random(2)
        long_probes = {n: [make_probe("passkey", tok, n, d, rng) for d in (0.1, 0.5, 0.9)] for n in lengths}
        models = ([] if args.yarn else [("source", src)]) + [(spec, None) for spec in args.layers]
        for name, m in models:
            if m is None:
                whole = sorted(int(x) for x in name.split(","))
                # the kept layers dense at every length: whether their positions carry, not InfLLM-V2's selection
                everywhere = args.yarn if args.yarn and not args.yarn_whole else 0.0
                reach = {} if args.sink_reach is None else {"lightning_sink_reach": args.sink_reach}
                m = hybrid(src, set(whole), args.window, args.hype, sparse_dense_len=2**62, rope_yarn=everywhere,
                           **reach)
                name = f"keep {whole}"
            if args.yarn and args.yarn_whole:
                yarn_in_whole_layers(m, args.yarn)
            t = time.perf_counter()
            row = {"model": name, "hype": args.hype, "yarn": args.yarn, "yarn_whole_only": args.yarn_whole,
                   "sink_reach": getattr(m.config, "lightning_sink_reach", None),
                   "passkey_logp_exact": {str(n): answers(m, ps) for n, ps in long_probes.items()},
                   "ppl512": {s: round(perplexity(m, tok, s, 512, max_windows=4).perplexity, 3) for s in SOURCES},
                   "seconds": round(time.perf_counter() - t)}
            rows.append(row)
            print(row, flush=True)
    else:
        if not args.layers:
            ap.error("keep needs at least one comma-separated layer list")
        for spec in args.layers:
            whole = sorted(int(x) for x in spec.split(","))
            m = hybrid(src, set(whole), args.window, args.hype)
            t = time.perf_counter()
            row = {"model": f"keep {whole}", "hype": args.hype, "answer_logp": answers(m, probes),
                   "passkey": run_retrieval(m, tok, "passkey", (1024, 4096), (0.1, 0.5), trials=2).grid,
                   "multikey": run_retrieval(m, tok, "multikey", (1024, 4096), (0.1, 0.5), trials=2).grid,
                   "ppl512": {s: round(perplexity(m, tok, s, 512, max_windows=4).perplexity, 3) for s in SOURCES},
                   "seconds": round(time.perf_counter() - t)}
            rows.append(row)
            print(row, flush=True)
        rows.append({"model": "source", "ppl512": {s: round(perplexity(src, tok, s, 512, max_windows=4).perplexity, 3)
                                                   for s in SOURCES}})
        print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
