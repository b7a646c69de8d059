"""Does it help to give SALA's fixed Lightning slopes to the source's heads by how far each head looks back?
(bench/results/retention.md, sixth session.)

    python bench/head_order_check.py [--seqs 8] [--steps 30]

SmolLM2-135M (the built-in default), fp32 on the CPU. Per layer and query head of the source: the attention-weighted
mean distance to the keys (queries from position 64 on, the first 4 keys left out as attention sinks) on 4 x 512
tokens of the plays. A Lightning layer's heads are then permuted so that the most local source head gets the fastest
decay (a permutation of the heads' rows of q/k/v/z, of the output norm and of o_proj's columns: the same function
with another slope per head). Both orders are aligned with the selection's stage-1 alignment (every layer's student
fed the teacher's input, MSE to the teacher's attention output) for --steps steps; printed: the relative error per
layer and its mean.
"""

from __future__ import annotations

import argparse
import time

import torch

from hybridize.arch.modeling_hybridize import apply_rope
from hybridize.convert.default_model import load_default_model
from hybridize.select.alignment import AlignSettings, align_students, init_students
from hybridize.select.data import calibration_data
from hybridize.select.runner import LayerRunner, reference_hybrid


@torch.no_grad()
def mean_distances(runner: LayerRunner, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer: (H,) attention-weighted mean query-key distance of each query head."""
    ctx = runner.context(ids)
    hidden = runner.embed(ids)
    T = ids.shape[1]
    distance = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0).float()[64:, 4:]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = []
    for layer in runner.layers:
        x = layer.input_layernorm(hidden)
        att = layer.self_attn
        B = x.shape[0]
        q = att.q_proj(x).view(B, T, att.num_heads, att.head_dim).transpose(1, 2)
        k = att.k_proj(x).view(B, T, att.num_kv_heads, att.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        k = k.repeat_interleave(att.num_heads // att.num_kv_heads, dim=1)
        p = ((q @ k.transpose(-1, -2)) * att.head_dim ** -0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        p = p[..., 64:, 4:]
        p = p / p.sum(-1, keepdim=True)
        out.append((p * distance).sum(-1).mean(dim=(0, 2)))
        hidden = hidden + att(x, ctx)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return out


@torch.no_grad()
def permute_heads(att, order: torch.Tensor) -> None:
    """Head j of the Lightning layer `att` becomes its head order[j] (K/V expanded to one head per query head)."""
    H, D = att.num_heads, att.head_dim
    for lin in [att.q_proj, att.k_proj, att.v_proj] + ([att.z_proj] if att.output_gates else []):
        lin.weight.copy_(lin.weight.view(H, D, -1)[order].reshape(H * D, -1))
        if lin.bias is not None:
            lin.bias.copy_(lin.bias.view(H, D)[order].reshape(-1))
    att.o_norm.weight.copy_(att.o_norm.weight.view(H, D)[order].reshape(-1))
    att.o_proj.weight.copy_(att.o_proj.weight.view(-1, H, D)[:, order].reshape(-1, H * D))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=8, help="512-token sequences of the plays to align on")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    source, tokenizer = load_default_model(torch.float32)
    runner = LayerRunner(reference_hybrid(source))
    data = calibration_data(tokenizer, train_seqs=args.seqs, heldout_seqs=2, seq_len=512)
    orders = [torch.argsort(d) for d in mean_distances(runner, data.train[:4])]  # most local first: fastest decay
    for name in ("index", "span"):
        torch.manual_seed(0)
        students = init_students(source)
        if name == "span":
            for student, order in zip(students, orders):
                permute_heads(student, order)
        t = time.perf_counter()
        r = align_students(runner, students, data.train, AlignSettings(steps=args.steps, batch_size=2), progress=False)
        errors = r.relative_error
        print(f"{name}: {time.perf_counter() - t:.0f} s, relative error per layer {[round(e, 3) for e in errors]}, "
              f"mean {sum(errors) / len(errors):.3f}", flush=True)


if __name__ == "__main__":
    main()
