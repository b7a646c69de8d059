"""How well the teacher reads a document that follows another one, by the token between them (recipes/README.md,
`document_separator`; bench/results/retention.md, tenth session, CPU).

    python bench/joined_documents.py --corpus tokens-teacher-....npz [--pairs 24] [--separators "<|endoftext|>"]
        [--source default]

A stage with `join_documents` lets each document read the ones before it in its sequence, so the teacher's targets
there are its predictions after another document and a separator. For random pairs (a, b) of the corpus' documents
(a cached teacher corpus: `ids` and `offsets` as `hybridize train` writes them, each document ending in the
tokenizer's end of text), the teacher's NLL of b's tokens after a is compared with its NLL of b alone, by position in
b, once with a's own last token (the end of text) and once per token of --separators in its place. SmolLM2-135M on 2
CPU cores: about 30 s per separator at 24 pairs of 200-700 tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from hybridize.train.models import load_source

BUCKETS = ((0, 32), (32, 128), (128, None))  # positions in the second document


def nll(model, ids: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(ids.astype(np.int64))[None]
    return F.cross_entropy(model(input_ids=x).logits[0, :-1].float(), x[0, 1:], reduction="none")


def penalty(model, pairs, separator: int | None) -> list[float]:
    """Mean NLL after the other document minus alone, per bucket of positions in the second document."""
    diff, count = np.zeros(len(BUCKETS)), np.zeros(len(BUCKETS))
    for a, b in pairs:
        if separator is not None:
            a = np.concatenate([a[:-1], [separator]])
        joined = nll(model, np.concatenate([a, b]))[len(a) - 1:]  # the predictions of b's tokens (its first included)
        d = (joined[1:] - nll(model, b)).numpy()  # alone, b's first token has no prediction: compare the rest
        for k, (s, e) in enumerate(BUCKETS):
            diff[k] += d[s:e].sum()
            count[k] += len(d[s:e])
    return list(diff / np.maximum(count, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="a cached token corpus (.npz with ids and offsets)")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--min-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=700)
    ap.add_argument("--separators", nargs="*", default=["<|endoftext|>"])
    ap.add_argument("--source", default="default")
    args = ap.parse_args()
    model, tok = load_source(args.source)
    model.eval()
    vocab = tok.get_vocab()
    unknown = [s for s in args.separators if s not in vocab]
    if unknown:
        raise SystemExit(f"the tokenizer has no token {unknown[0]!r}: give --separators from its vocabulary")
    z = np.load(args.corpus)
    ids, offsets = z["ids"], z["offsets"]
    docs = [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    docs = [d for d in docs if args.min_tokens <= len(d) <= args.max_tokens]
    rng = np.random.default_rng(0)
    pairs = [(docs[i], docs[j]) for i, j in rng.integers(0, len(docs), (args.pairs, 2)) if i != j]
    print(f"{len(pairs)} pairs of documents of {args.min_tokens}-{args.max_tokens} tokens; the tokenizer's end of "
          f"text: {tok.eos_token!r}")
    print("| between the documents | " + " | ".join(f"NLL after - alone, tokens {s}-{e or 'end'}" for s, e in BUCKETS)
          + " | seconds |")
    print("|---|" + "---|" * (len(BUCKETS) + 1))
    with torch.no_grad():
        for name, sep in [(f"{tok.eos_token} (as cached)", None)] + [(s, vocab[s]) for s in args.separators]:
            t = time.perf_counter()
            row = penalty(model, pairs, sep)
            print(f"| {name} | " + " | ".join(f"{x:+.3f}" for x in row) + f" | {time.perf_counter() - t:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
