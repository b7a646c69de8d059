"""Training losses. Each returns (sum over counted items, count) so that a global batch split over micro-batches and
processes is normalised once, by the global count, exactly as if it had run in one piece.

Targets follow the causal-LM convention: position t predicts token t+1 of the same document; positions whose target
is -100 (a document's last token, padding) count for neither cross-entropy nor KL.
"""

from __future__ import annotations

import torch

from hybridize.kernels.loss_triton import HAS_TRITON, row_loss_reference, row_losses_triton

IGNORE = -100


# Rows of logits processed at a time by the PyTorch form: the full (tokens x vocabulary) matrix is never copied to
# float32 (at 16K tokens and a 128K vocabulary one float32 copy is 8 GiB); each loss computes its gradient chunk by
# chunk in the forward pass and keeps only that gradient (in the logits' dtype) for the backward pass. On a GPU the
# Triton kernel does the same for all rows in two passes over the logits, with no float32 copy.
CHUNK_ROWS = 2048


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _use_kernel(student: torch.Tensor) -> bool:
    return HAS_TRITON and student.is_cuda and student.dtype in (torch.float32, torch.bfloat16, torch.float16)


def chunked_row_losses(student, other, keep, mode: str, temperature: float, need_grad: bool):
    """(sum over kept rows of the `mode` loss, d sum / d student or None) in plain PyTorch, CHUNK_ROWS rows at a
    time in float32 (float64 for float64 logits): what the Triton kernel computes, on any device. Rows not kept
    are computed and then zeroed (`where`, so that whatever their logits hold cannot leak into the sum): selecting
    the kept rows would need their number on the host, a wait for the GPU in the middle of every training step."""
    grad = torch.empty_like(student) if need_grad else None
    total = student.new_zeros((), dtype=_compute_dtype(student))
    for a in range(0, student.shape[0], CHUNK_ROWS):
        k = keep[a : a + CHUNK_ROWS, None]
        loss, g = row_loss_reference(student[a : a + CHUNK_ROWS].to(total.dtype), other[a : a + CHUNK_ROWS], mode,
                                     temperature, need_grad)
        total = total + torch.where(k[:, 0], loss, 0.0).sum()
        if need_grad:
            grad[a : a + CHUNK_ROWS] = torch.where(k, g, 0.0)
    return total, grad


class _RowLoss(torch.autograd.Function):
    """sum over kept rows of the `mode` loss of student[r] against other[r], with its gradient w.r.t. `student`
    computed in the forward pass: by the Triton kernel on a GPU (kernels/loss_triton.py), else in chunks."""

    @staticmethod
    def forward(ctx, student, other, keep, mode, temperature):
        need_grad = ctx.needs_input_grad[0]
        if _use_kernel(student):
            loss, grad = row_losses_triton(student, other, keep, mode, temperature, need_grad)
            total = loss.sum()
        else:
            total, grad = chunked_row_losses(student, other, keep, mode, temperature, need_grad)
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
    return _RowLoss.apply(flat, t, keep, "ce", 1.0), keep.sum()


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
    return _RowLoss.apply(flat_s, flat_t, keep, direction, float(temperature)), keep.sum()


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
