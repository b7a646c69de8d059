"""Cheap layer-importance proxies that need no alignment."""

from __future__ import annotations

import torch


@torch.no_grad()
def block_influence(state_batches: list[list[torch.Tensor]]) -> list[float]:
    """Per layer: mean over tokens of 1 - cos(stream entering the layer, stream leaving it) (ShortGPT's BI).
    `state_batches`: per batch, the L + 1 residual streams from `LayerRunner.layer_inputs`."""
    L = len(state_batches[0]) - 1
    sums, count = [0.0] * L, 0
    for states in state_batches:
        for i in range(L):
            cos = torch.nn.functional.cosine_similarity(states[i].float(), states[i + 1].float(), dim=-1)
            sums[i] += (1.0 - cos).sum().item()
        count += states[0].shape[0] * states[0].shape[1]
    return [s / count for s in sums]
