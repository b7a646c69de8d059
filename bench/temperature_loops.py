"""How often the teacher falls into loops at each sampling temperature (bench/results/retention.md, ninth session, CPU).

    python bench/temperature_loops.py [--samples 48] [--temperatures 0.9 1.0 1.1] [--source default]
        [--start-token "<|endoftext|>"] [--show N]

Unprompted samples of at most 768 new tokens (the retention recipe's second source with only the temperature
changed), the same seed at every temperature, measured with `hybridize.train.repetition`: the share of 128-token
windows more than half repeated, and the tokens `max_repetition` would cut at 0.5 and 0.3. SmolLM2-135M on 2 CPU
cores: about 160 s per temperature at 48 samples.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hybridize.train.data import generate_documents, tokenize_documents
from hybridize.train.models import load_source
from hybridize.train.recipe import SourceSpec
from hybridize.train.repetition import WINDOW, repeated_ngrams, repetition_cuts


def loop_rates(ids: np.ndarray, offsets: np.ndarray) -> dict[str, float]:
    lengths = np.diff(offsets)
    rep = np.concatenate([[0], np.cumsum(repeated_ngrams(ids, offsets))])
    shares = (rep[WINDOW:] - rep[:-WINDOW]) / WINDOW  # windows that span two documents count too: a rough rate
    return {"mean_tokens": float(lengths.mean()), "windows_over_half": float((shares > 0.5).mean()),
            **{f"cut_{t}": float(1 - repetition_cuts(ids, offsets, t).sum() / lengths.sum()) for t in (0.5, 0.3)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.9, 1.0, 1.1])
    ap.add_argument("--source", default="default")
    ap.add_argument("--start-token", default=None, help="the source's start_token (default: the tokenizer's BOS)")
    ap.add_argument("--show", type=int, default=0, help="print the first 160 characters of this many samples")
    args = ap.parse_args()
    model, tok = load_source(args.source)
    model.eval()
    print("| temperature | mean tokens | windows more than half repeated | cut at 0.5 | cut at 0.3 | seconds |")
    for temp in args.temperatures:
        src = SourceSpec(type="teacher", unprompted=True, num_samples=args.samples, max_new_tokens=768,
                         temperature=temp, batch_size=args.samples, start_token=args.start_token)
        t = time.perf_counter()
        texts = generate_documents(model, tok, src, seed=0, progress=False)
        for text in texts[: args.show]:
            print(repr(text[:160]))
        docs = tokenize_documents(texts, tok)
        r = loop_rates(docs.ids, docs.offsets)
        print(f"| {temp} | {r['mean_tokens']:.0f} | {r['windows_over_half']:.1%} | {r['cut_0.5']:.1%} | "
              f"{r['cut_0.3']:.1%} | {time.perf_counter() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
