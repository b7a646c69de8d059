"""The loss kernel (kernels/loss_triton.py) against its PyTorch reference: every mode, the loss of each row and the
gradient, rows dropped, vocabularies that are not a multiple of the block, logits far apart.

On CPU the kernel runs under the Triton interpreter in float32 on small shapes; on a GPU it runs in bf16 on the
SmolLM2 vocabulary, and the trainer's losses (kl_sum, cross_entropy_sum) take it there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import load_interpreted
from hybridize.kernels.loss_triton import MODES, row_loss_reference

pytest.importorskip("triton")

KERNEL_FILE = Path(__file__).resolve().parents[1] / "kernels" / "loss_triton.py"


@pytest.fixture(scope="module")
def interp():
    return load_interpreted(KERNEL_FILE)


def _case(R, V, seed, spread=3.0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(R, V, generator=g) * spread).to(device, dtype)
    t = (torch.randn(R, V, generator=g) * spread).to(device, dtype)
    y = torch.randint(0, V, (R,), generator=g)
    keep = torch.rand(R, generator=g) > 0.25
    keep[0] = True
    y[~keep] = -100  # what the trainer puts where nothing is predicted
    return s, t, y.to(device), keep.to(device)


def _reference(s, t, y, keep, mode, T):
    loss, grad = row_loss_reference(s.double(), y if mode == "ce" else t, mode, T)
    k = keep.to(s.device)
    return torch.where(k, loss, 0.0), torch.where(k[:, None], grad, 0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("R,V,block,T,spread", [(5, 1000, 256, 1.0, 3.0), (9, 77, 32, 2.5, 3.0),
                                                 (3, 300, 512, 1.0, 40.0)])
def test_kernel_matches_reference(interp, mode, R, V, block, T, spread):
    s, t, y, keep = _case(R, V, seed=R * 1000 + V, spread=spread)
    loss, grad = interp.row_losses_triton(s, y if mode == "ce" else t, keep, mode, T, block=block)
    want_loss, want_grad = _reference(s, t, y, keep, mode, 1.0 if mode == "ce" else T)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5 * spread)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6 * spread)  # float32 against float64
    assert (loss[~keep] == 0).all() and (grad[~keep] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_kernel_without_gradient_gives_the_same_loss(interp, mode):
    s, t, y, keep = _case(4, 333, seed=7)
    other = y if mode == "ce" else t
    with_grad, _ = interp.row_losses_triton(s, other, keep, mode, 1.5, block=128)
    loss, grad = interp.row_losses_triton(s, other, keep, mode, 1.5, need_grad=False, block=128)
    assert grad is None
    torch.testing.assert_close(loss, with_grad)


def test_dropped_rows_with_extreme_logits_contribute_nothing(interp):
    s, t, y, keep = _case(6, 200, seed=11)
    keep[3] = False
    s2, t2 = s.clone(), t.clone()
    s2[3], t2[3] = 1e4, -1e4
    for mode in MODES:
        a, ga = interp.row_losses_triton(s, y if mode == "ce" else t, keep, mode, 1.0, block=64)
        b, gb = interp.row_losses_triton(s2, y if mode == "ce" else t2, keep, mode, 1.0, block=64)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


def test_unknown_mode_is_refused():
    from hybridize.kernels.loss_triton import row_losses_triton

    with pytest.raises(ValueError, match="mode must be one of"):
        row_losses_triton(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, dtype=torch.bool), "kl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_gpu_kernel_matches_reference_in_bf16(mode):
    """SmolLM2's vocabulary (49,152) and one odd row count, bf16 logits as autocast gives them; the reference in
    float64 from the same bf16 values."""
    from hybridize.kernels.loss_triton import row_losses_triton

    s, t, y, keep = _case(1027, 49152, seed=5, device="cuda", dtype=torch.bfloat16)
    loss, grad = row_losses_triton(s, y if mode == "ce" else t, keep, mode, 1.0)
    want_loss, want_grad = _reference(s, t, y, keep, mode, 1.0)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-4)
    err = (grad.double() - want_grad).abs().max() / want_grad.abs().max()
    assert err < 1e-2, err  # the gradient is written in bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_trainer_losses_take_the_kernel_and_agree_with_the_cpu():
    from hybridize.train.losses import cross_entropy_sum, kl_sum

    s, t, y, _ = _case(2 * 1500, 4099, seed=9, dtype=torch.bfloat16)
    s, t, y = s.view(2, 1500, -1), t.view(2, 1500, -1), y.view(2, 1500)
    for fn, args, kw in ((kl_sum, (t, y), dict(temperature=2.0, direction="forward")),
                         (kl_sum, (t, y), dict(direction="reverse")), (cross_entropy_sum, (y,), {})):
        a = s.clone().requires_grad_(True)
        cpu_total, cpu_n = fn(a, *args, **kw)
        cpu_total.backward()
        b = s.cuda().requires_grad_(True)
        gpu_total, gpu_n = fn(b, *(x.cuda() for x in args), **kw)
        gpu_total.backward()
        assert int(gpu_n) == int(cpu_n)
        assert float(gpu_total) == pytest.approx(float(cpu_total), rel=1e-4)
        err = (b.grad.cpu().double() - a.grad.double()).abs().max() / a.grad.double().abs().max()
        assert err < 1e-2, (fn.__name__, kw, err)


def test_exported_folders_leave_the_training_kernel_out():
    from hybridize.export import architecture_files

    names = {p.name for p in architecture_files()}
    assert "loss_triton.py" not in names
    assert {"lightning_triton.py", "sparse_triton.py", "modeling_hybridize.py"} <= names
