"""The sweep: swap one layer at a time for another module (an aligned Lightning student; the layer's own attention cut
to a window) and measure general (C) and retrieval (R) ability.

The teacher's residual stream entering each layer is computed once per probe input; a swap at layer i restarts from
the stream entering layer i, so layers before it are never recomputed. The window search's rounds do the same from
a forward with its cut layers in place (`answer_logp_restoring`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .probes import ProbeSample, answer_logprob, answer_matches, answer_positions, retrieval_scores
from .runner import LayerRunner


@dataclass
class Measure:
    """Abilities with one layer swapped (layer = None: the unmodified teacher)."""

    layer: int | None
    loss: float  # held-out LM loss (nats/token)
    C: float  # general ability = -loss
    R: float  # retrieval ability = mean exact-match accuracy over task@length groups
    retrieval: dict[str, float] = field(default_factory=dict)
    # mean log-probability of the probes' answer tokens: it moves where exact match, all or nothing, does not
    answer_logp: float = 0.0


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

    def _replaced(self, inp: _Input, replace: dict[int, nn.Module]) -> torch.Tensor:
        """The final normed stream with `replace[i]` as layer i's attention, from the first replaced layer on."""
        if not replace:
            return self.runner.model.model.norm(inp.states[-1])
        start = min(replace)
        return self.runner.run_from(start, inp.states[start], self.runner.context(inp.ids), replace)

    def _answer_logits(self, inp: _Input, replace: dict[int, nn.Module]) -> torch.Tensor:
        """The logits at the positions that predict the probe's answer tokens."""
        return self._logits_at(inp, self._replaced(inp, replace)[0])

    def _logits_at(self, inp: _Input, normed: torch.Tensor) -> torch.Tensor:
        """From one probe's final normed stream (T, H), the logits at its answer-predicting positions."""
        return self.runner.logits(normed[inp.positions.to(normed.device)])

    @torch.no_grad()
    def answer_logp(self, replace: dict[int, nn.Module]) -> float:
        """Mean log-probability of the probes' answer tokens with several layers replaced at once."""
        logp = sum(answer_logprob(self._answer_logits(inp, replace), inp.sample) for inp in self.probe_inputs)
        return logp / self._answer_count()

    @torch.no_grad()
    def answer_logp_restoring(self, replace: dict[int, nn.Module], restore: list[int], on_batch=None,
                              restored=None) -> tuple[float, dict[int, float]]:
        """`answer_logp(replace)`, and for each layer i of `restore` (all in `replace`) the same with layer i's own
        attention back (`restored[i]` instead where given). Per batch of probes, one forward with `replace` keeps the
        stream entering each layer; the variant for layer i runs from there (layers before i compute what they compute
        with `replace`), so a round of a greedy search costs about half of `len(restore)` full forwards. `on_batch()`
        after each batch."""
        return self._restoring(self.probe_batches(), self._batch_logprob, self._answer_count(), replace, restore,
                               on_batch, restored)

    @torch.no_grad()
    def heldout_logp_restoring(self, replace: dict[int, nn.Module], restore: list[int], on_batch=None,
                               restored=None) -> tuple[float, dict[int, float]]:
        """As `answer_logp_restoring`, for the held-out text's mean next-token log-probability (minus its loss)."""
        return self._restoring([[inp] for inp in self.heldout_batches], self._text_logprob, self._text_count(),
                               replace, restore, on_batch, restored)

    def _restoring(self, batches, metric, count: int, replace, restore, on_batch, restored):
        base, variants = 0.0, dict.fromkeys(restore, 0.0)
        for group in batches:
            ids = torch.cat([inp.ids for inp in group])
            ctx = self.runner.context(ids)
            states = self.runner.layer_inputs(ids, replace)
            base += metric(group, self.runner.model.model.norm(states[-1]))
            for i in restore:
                rest = {j: m for j, m in replace.items() if j != i}
                if restored is not None:
                    rest[i] = restored[i]
                variants[i] += metric(group, self.runner.run_from(i, states[i], ctx, rest))
            if on_batch is not None:
                on_batch()
        return base / count, {i: v / count for i, v in variants.items()}

    def _text_logprob(self, group: list[_Input], normed: torch.Tensor) -> float:
        ids = torch.cat([inp.ids for inp in group]).to(normed.device)
        logits = self.runner.logits(normed[:, :-1])
        return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()

    def _batch_logprob(self, group: list[_Input], normed: torch.Tensor) -> float:
        return sum(answer_logprob(self._logits_at(inp, normed[b]), inp.sample) for b, inp in enumerate(group))

    def _text_count(self) -> int:
        return max(sum(inp.ids[:, 1:].numel() for inp in self.heldout_batches), 1)

    def _answer_count(self) -> int:
        return max(sum(len(inp.positions) for inp in self.probe_inputs), 1)

    def probe_batches(self, max_tokens: int = 16384) -> list[list[_Input]]:
        """Probes of one token length stacked, up to `max_tokens` a batch: on a GPU one forward of several short
        probes costs about what one costs."""
        by_length: dict[int, list[_Input]] = {}
        for inp in self.probe_inputs:
            by_length.setdefault(inp.ids.shape[1], []).append(inp)
        out = []
        for length, group in by_length.items():
            size = max(max_tokens // length, 1)
            out.extend(group[k:k + size] for k in range(0, len(group), size))
        return out

    @torch.no_grad()
    def measure(self, layer: int | None = None, student: nn.Module | None = None) -> Measure:
        replace = {} if layer is None else {layer: student}
        text_logp = sum(self._text_logprob([inp], self._replaced(inp, replace)) for inp in self.heldout_batches)
        groups: dict[str, list[bool]] = {}
        logp, answers = 0.0, 0
        for inp in self.probe_inputs:
            picked = self._answer_logits(inp, replace)
            groups.setdefault(f"{inp.sample.task}@{inp.sample.length}", []).extend(answer_matches(picked, inp.sample))
            logp += answer_logprob(picked, inp.sample)
            answers += len(inp.positions)
        scores = retrieval_scores(groups)
        loss = -text_logp / self._text_count()
        return Measure(layer, loss, -loss, scores.pop("R"), scores, logp / max(answers, 1))

    def sweep(self, students: nn.ModuleList, progress: bool = True) -> list[Measure]:
        """`students[i]`: the module that replaces layer i's attention."""
        out = []
        for i in tqdm(range(self.runner.num_layers), desc="sweep layers", disable=not progress):
            out.append(self.measure(i, students[i]))
        return out
