"""The sweep: swap one layer at a time for its aligned student and measure general (C) and retrieval (R) ability.

The teacher's residual stream entering each layer is computed once per probe input; a swap at layer i restarts from
the stream entering layer i, so layers before it are never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .probes import ProbeSample, answer_matches, answer_positions, retrieval_scores
from .runner import LayerRunner


@dataclass
class Measure:
    """Abilities with one layer swapped (layer = None: the unmodified teacher)."""

    layer: int | None
    loss: float  # held-out LM loss (nats/token)
    C: float  # general ability = -loss
    R: float  # retrieval ability = mean exact-match accuracy over task@length groups
    retrieval: dict[str, float] = field(default_factory=dict)


@dataclass
class _Input:
    ids: torch.Tensor  # (B, T)
    states: list[torch.Tensor]  # teacher stream entering each layer (+ final), (B, T, H)
    positions: torch.Tensor | None  # logit positions needed (probes); None = all (held-out loss)
    sample: ProbeSample | None


class Sweep:
    def __init__(self, runner: LayerRunner, heldout: torch.Tensor, probes: list[ProbeSample],
                 heldout_batch: int = 4):
        self.runner = runner
        self.heldout_batches = [_Input(b, runner.layer_inputs(b), None, None) for b in heldout.split(heldout_batch)]
        self.probe_inputs = []
        for s in probes:
            ids = s.input_ids.view(1, -1)
            self.probe_inputs.append(_Input(ids, runner.layer_inputs(ids), answer_positions(s), s))

    def _final(self, inp: _Input, layer: int | None, student: nn.Module | None) -> torch.Tensor:
        if layer is None:
            return self.runner.model.model.norm(inp.states[-1])
        ctx = self.runner.context(inp.ids)
        return self.runner.run_from(layer, inp.states[layer], ctx, {layer: student})

    @torch.no_grad()
    def measure(self, layer: int | None = None, student: nn.Module | None = None) -> Measure:
        total, count = 0.0, 0
        for inp in self.heldout_batches:
            logits = self.runner.logits(self._final(inp, layer, student)[:, :-1])
            target = inp.ids[:, 1:].to(logits.device)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            count += target.numel()
        groups: dict[str, list[bool]] = {}
        for inp in self.probe_inputs:
            hidden = self._final(inp, layer, student)[0]
            picked = self.runner.logits(hidden[inp.positions.to(hidden.device)])
            groups.setdefault(f"{inp.sample.task}@{inp.sample.length}", []).extend(answer_matches(picked, inp.sample))
        scores = retrieval_scores(groups)
        loss = total / max(count, 1)
        return Measure(layer, loss, -loss, scores.pop("R"), scores)

    def sweep(self, students: nn.ModuleList, progress: bool = True) -> list[Measure]:
        out = []
        for i in tqdm(range(self.runner.num_layers), desc="sweep layers", disable=not progress):
            out.append(self.measure(i, students[i]))
        return out
