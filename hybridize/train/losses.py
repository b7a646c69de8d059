"""Training losses. Each returns (sum over counted items, count) so that a global batch split over micro-batches and
processes is normalised once, by the global count, exactly as if it had run in one piece.

Targets follow the causal-LM convention: position t predicts token t+1 of the same document; positions whose target
is -100 (a document's last token, padding) count for neither cross-entropy nor KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


# Rows of logits processed at a time: the full (tokens x vocabulary) matrix is never copied to float32 (at 16K tokens
# and a 128K vocabulary one float32 copy is 8 GiB); each loss computes its gradient chunk by chunk in the forward pass
# and keeps only that gradient (in the logits' dtype) for the backward pass.
CHUNK_ROWS = 2048


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _ChunkedRowLoss(torch.autograd.Function):
    """sum over kept rows r of row_loss(student[r], other[r]) with its gradient w.r.t. `student`, computed in chunks
    of consecutive rows. Rows not kept are computed and then zeroed (`where`, so that whatever their logits hold
    cannot leak into the sum): selecting the kept rows would need their number on the host, a wait for the GPU in
    the middle of every training step.

    `row_fn(s, o, need_grad) -> (loss per row, d loss / d s)` works on one chunk in the compute dtype."""

    @staticmethod
    def forward(ctx, student, other, keep, row_fn, chunk):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if need_grad else None
        total = student.new_zeros((), dtype=_compute_dtype(student))
        for a in range(0, student.shape[0], chunk):
            k = keep[a : a + chunk, None]
            loss, g = row_fn(student[a : a + chunk].to(total.dtype), other[a : a + chunk], need_grad)
            total = total + torch.where(k[:, 0], loss, 0.0).sum()
            if need_grad:
                grad[a : a + chunk] = torch.where(k, g, 0.0)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def _kept(targets: torch.Tensor) -> torch.Tensor:
    return targets.reshape(-1) != IGNORE


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V), targets (...) with IGNORE where nothing is predicted."""
    flat = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1).to(flat.device)
    keep = _kept(t)

    def row_fn(s, y, need_grad):
        y = y.clamp(min=0)  # an ignored row's target is IGNORE; its loss is dropped, any index will do
        log_p = F.log_softmax(s, dim=-1)
        loss = -log_p.gather(1, y[:, None]).squeeze(1)
        g = None
        if need_grad:
            g = log_p.exp_()
            g.scatter_add_(1, y[:, None], -torch.ones_like(g[:, :1]))
        return loss, g

    total = _ChunkedRowLoss.apply(flat, t, keep, row_fn, CHUNK_ROWS)
    return total, keep.sum()


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
           temperature: float = 1.0, direction: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level KL between softened distributions, summed over counted positions, times temperature^2.

    forward: KL(teacher || student) = sum_v p_t (log p_t - log p_s)   (mean-seeking, HALO's stage 2)
    reverse: KL(student || teacher) = sum_v p_s (log p_s - log p_t)   (mode-seeking)
    Gradients w.r.t. the student's logits z (softened s = z / T), per row: forward T (p_s - p_t); reverse
    T p_s (log p_s - log p_t - KL_row).
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"kl direction must be forward or reverse, got {direction!r}")
    V = student_logits.shape[-1]
    flat_s = student_logits.reshape(-1, V)
    flat_t = teacher_logits.reshape(-1, V).to(flat_s.device)
    keep = _kept(targets.to(flat_s.device))
    T = float(temperature)

    def row_fn(s, t, need_grad):
        log_s = F.log_softmax(s / T, dim=-1)
        log_t = F.log_softmax(t.to(s.dtype) / T, dim=-1)
        g = None
        if direction == "forward":
            p_t = log_t.exp()
            loss = (p_t * (log_t - log_s)).sum(-1)
            if need_grad:
                g = (log_s.exp() - p_t) * T
        else:
            p_s = log_s.exp()
            d = log_s - log_t
            loss = (p_s * d).sum(-1)
            if need_grad:
                g = p_s * (d - loss[:, None]) * T
        return loss * T**2, g

    total = _ChunkedRowLoss.apply(flat_s, flat_t, keep, row_fn, CHUNK_ROWS)
    return total, keep.sum()


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
