"""Where a model's pass-key answer is won or lost, token by token.

For each probe: the answer's tokens (for SmolLM2 a space token, then one token per digit), the model's log-probability
of each under teacher forcing, and its own top choice there. A model that ranks the key first among ten (the
report's likelihood choice) but fails greedy exact match shows here which token it loses.

    python bench/passkey_tokens.py default                  # the source (SmolLM2 GGUF)
    python bench/passkey_tokens.py HYBRID_FOLDER --lengths 1024,4096 --depths 0.1,0.5,0.9 --out tokens.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from hybridize.eval.loading import load_model
from hybridize.eval.retrieval import build_probe, random_keys


@torch.no_grad()
def answer_tokens(model, tokenizer, length: int, depth: float, key: str) -> list[dict]:
    prompt, answer = build_probe(tokenizer, length, depth, key)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer], device=device)
    # the last prompt position predicts the answer's first token; the answer's own positions the rest
    logits = model(input_ids=ids, use_cache=False).logits
    lp = logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    rows = []
    for j, t in enumerate(answer):
        best = int(lp[j].argmax())
        rows.append({"token": tokenizer.decode([t]), "logprob": round(float(lp[j, t]), 3),
                     "top": tokenizer.decode([best]), "top_logprob": round(float(lp[j, best]), 3)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model folder, a GGUF file or `default` (the built-in SmolLM2)")
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    loaded = load_model(args.model, dtype=torch.float32, device=args.device)
    model, tok = loaded.model.eval(), loaded.tokenizer
    rng = random.Random(args.seed)
    out = []
    for length in (int(x) for x in args.lengths.split(",")):
        for depth in (float(x) for x in args.depths.split(",")):
            key = random_keys(rng, 5, 1)[0]
            rows = answer_tokens(model, tok, length, depth, key)
            out.append({"length": length, "depth": depth, "key": key, "tokens": rows})
            cells = " | ".join(f"{r['token']!r} {r['logprob']:.2f}" + ("" if r["top"] == r["token"] else
                                                                          f" (top {r['top']!r} {r['top_logprob']:.2f})")
                               for r in rows)
            print(f"{length:>6} {depth:.1f} {key}  {cells}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": loaded.name, "probes": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
