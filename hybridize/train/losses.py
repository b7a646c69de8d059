"""Training losses. Each returns (sum over counted items, count) so that a global batch split over micro-batches and
processes is normalised once, by the global count, exactly as if it had run in one piece.

Targets follow the causal-LM convention: position t predicts token t+1 of the same document; positions whose target
is -100 (a document's last token, padding) count for neither cross-entropy nor KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V), targets (...) with IGNORE where nothing is predicted."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    t = targets.reshape(-1)
    loss = F.cross_entropy(flat, t, ignore_index=IGNORE, reduction="sum")
    return loss, (t != IGNORE).sum()


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
           temperature: float = 1.0, direction: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level KL between softened distributions, summed over counted positions, times temperature^2.

    forward: KL(teacher || student) = sum_v p_t (log p_t - log p_s)   (mean-seeking, HALO's stage 2)
    reverse: KL(student || teacher) = sum_v p_s (log p_s - log p_t)   (mode-seeking)
    """
    keep = targets.reshape(-1) != IGNORE
    s = student_logits.reshape(-1, student_logits.shape[-1])[keep].float() / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep].float() / temperature
    log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if direction == "forward":
        kl = (log_t.exp() * (log_t - log_s)).sum()
    elif direction == "reverse":
        kl = (log_s.exp() * (log_s - log_t)).sum()
    else:
        raise ValueError(f"kl direction must be forward or reverse, got {direction!r}")
    return kl * temperature**2, keep.sum()


def hidden_mse_sum(student_hidden, teacher_hidden, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the chosen layers of the per-token squared error of layer outputs, summed over tokens.

    `student_hidden`/`teacher_hidden` are the models' `hidden_states` tuples (embeddings first, so layer i's output is
    entry i + 1). Per token: mean over layers and hidden units of (h_s - h_t)^2. Count: tokens.
    """
    total = None
    for i in layers:
        hs, ht = student_hidden[i + 1].float(), teacher_hidden[i + 1].float()
        err = (hs - ht.to(hs.device)).pow(2).mean(-1).sum()
        total = err if total is None else total + err
    tokens = student_hidden[0].shape[0] * student_hidden[0].shape[1]
    return total / len(layers), torch.tensor(tokens, device=student_hidden[0].device)
