"""The window method: which layers keep their full attention when every other layer sees only a window.

A Lightning layer with `lightning_window` keeps its source layer's attention over the first `sinks` and last `window`
tokens. Retrieval from further back then rests on the layers that stay attention, and it needs some of them together
(SmolLM2-135M: eight layers chosen by what cutting each alone costs retrieve 1 of 8 pass-keys with the other 22 cut,
eight chosen by this search 6; bench/results/retention.md, fourteenth session). So the layers are chosen greedily on
the joint effect: start from every layer cut, then give back full attention, one layer per round, to the layer that
raises the probes' answer log-probability most.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch.configuration_hybridize import LIGHTNING
from ..convert.build import build_hybrid
from .runner import has_qk_norm
from .sweep import Sweep


class _WindowBranch(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, x, ctx):
        return self.attention.window_only(x, ctx)


def window_cuts(model, window: int, sinks: int) -> nn.ModuleList:
    """Per layer, the source's attention cut to the first `sinks` and last `window` tokens: a fresh Lightning layer
    with `lightning_window` (whose recurrent branch starts at zero), its window branch alone."""
    L = model.config.num_hidden_layers
    cut = build_hybrid(model, [LIGHTNING] * L, hype=False, output_gates=False, qk_norm=has_qk_norm(model),
                       lightning_window=window, lightning_sinks=sinks)
    return nn.ModuleList(_WindowBranch(layer.self_attn) for layer in cut.model.layers)


def nope_attention(runner) -> nn.ModuleList:
    """Per layer, its own full attention without RoPE: what a sparse layer of a HyPE hybrid computes (below its dense
    length). Shares the runner's weights."""
    out = []
    for layer in runner.layers:
        attention = copy.copy(layer.self_attn)  # a shallow copy: the same parameters, its own use_rope
        attention.use_rope = False
        out.append(attention)
    return nn.ModuleList(out)


@dataclass
class WindowSearch:
    chosen: list[int]
    gains: list[float]  # per layer: objective gained by its full attention, at the round that picked it (or last)
    all_cut_logp: float  # every layer cut (the forced ones too): the probes' answer log-probability
    # {"layer", "answer_logp"} per pick, forced ones first; with a general weight also "text_logp" and "objective"
    rounds: list[dict] = field(default_factory=list)


@torch.no_grad()
def greedy_window_choice(sweep: Sweep, cuts: nn.ModuleList, n_sparse: int, forced: list[int],
                         progress: bool = True, wholes: nn.ModuleList | None = None,
                         general_weight: float = 0.0) -> WindowSearch:
    """`n_sparse` layers kept whole: `forced` first, then greedily by the probes' answer log-probability plus
    `general_weight` times the held-out text's next-token log-probability (both nats per token: retrieval and what the
    text needs beyond the window). `wholes`: what a kept layer computes (e.g. `nope_attention`, as HyPE runs it);
    None: the source's own attention."""
    L = len(cuts)

    def cut_except(whole: set[int]) -> dict[int, nn.Module]:
        kept = {j: wholes[j] for j in whole} if wholes is not None else {}
        return {**kept, **{j: cuts[j] for j in range(L) if j not in whole}}

    def measured(whole: set[int], restore: list[int], on_batch=None) -> tuple[dict, dict[int, dict]]:
        replace = cut_except(whole)
        answer, answers = sweep.answer_logp_restoring(replace, restore, on_batch=on_batch, restored=wholes)
        if not general_weight:
            return {"answer_logp": answer}, {i: {"answer_logp": v} for i, v in answers.items()}
        text, texts = sweep.heldout_logp_restoring(replace, restore, on_batch=on_batch, restored=wholes)

        def both(a: float, t: float) -> dict:
            return {"answer_logp": a, "text_logp": t, "objective": a + general_weight * t}

        return both(answer, text), {i: both(answers[i], texts[i]) for i in restore}

    def objective(m: dict) -> float:
        return m.get("objective", m["answer_logp"])

    whole: set[int] = set()
    current, _ = measured(whole, [])
    all_cut = current["answer_logp"]
    rounds = []
    for i in forced:
        whole.add(i)
        current, _ = measured(whole, [])
        rounds.append({"layer": i, **current})
    gains: list[float | None] = [None] * L
    picks = max(n_sparse - len(whole), 1)  # one round at least, so that every layer has a gain to report
    per_round = len(sweep.probe_batches()) + (len(sweep.heldout_batches) if general_weight else 0)
    bar = tqdm(total=picks * per_round, desc="window search (rounds x batches)", disable=not progress)
    trial: dict[int, float] = {}
    for _ in range(picks):
        current, restored = measured(whole, [i for i in range(L) if i not in whole], on_batch=bar.update)
        trial = {i: objective(m) - objective(current) for i, m in restored.items()}
        if len(whole) >= n_sparse:
            break
        best = max(trial, key=lambda i: (trial[i], -i))
        whole.add(best)
        gains[best] = trial[best]
        rounds.append({"layer": best, **restored[best]})
    bar.close()
    for i, g in trial.items():
        if gains[i] is None:
            gains[i] = g
    for i in forced:  # kept before any round: no gain measured
        gains[i] = 0.0
    return WindowSearch(sorted(whole), [float(g) for g in gains], all_cut, rounds)
