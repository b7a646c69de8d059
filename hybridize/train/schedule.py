"""Learning-rate schedules: linear warmup, then constant / cosine / linear / WSD / exponential decay to `min_lr`."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, total: int, lr: float, min_lr: float, schedule: str, warmup: int = 0,
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    p = min(max((step - warmup) / span, 0.0), 1.0)  # progress through the decay part, 0 -> 1
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return lr + (min_lr - lr) * p
    if schedule == "exponential":
        return lr * (min_lr / lr) ** p
    if schedule == "wsd":  # warmup-stable-decay: constant, then a linear decay over the last `decay_fraction`
        start = 1.0 - decay_fraction
        if p <= start:
            return lr
        return lr + (min_lr - lr) * (p - start) / decay_fraction
    raise ValueError(f"unknown schedule {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, stage, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor times `stage.lr` follows `lr_at` (the optimizer must be built with lr=stage.lr)."""

    def factor(step: int) -> float:
        return lr_at(step, total=total_steps, lr=stage.lr, min_lr=stage.min_lr, schedule=stage.schedule,
                     warmup=stage.warmup_steps, decay_fraction=stage.decay_fraction) / stage.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
