"""The window branch's Triton kernel against the definition (kernels/window_reference.py): forward and every gradient
on random inputs, odd lengths and head sizes, GQA, no sinks, packed documents and left-padded rows.

On the CPU the kernels run under the Triton interpreter in float32 on small shapes (tests/helpers.load_interpreted);
on a GPU, tests/test_window_attention.py checks it in bf16 at the recipe's window and bench/bench_window.py times it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import load_interpreted
from hybridize.kernels.window_reference import window_attention_reference

pytest.importorskip("triton")

KERNEL_FILE = Path(__file__).resolve().parents[1] / "kernels" / "window_triton.py"


@pytest.fixture(scope="module")
def interp():
    return load_interpreted(KERNEL_FILE)


def random_qkv(B, H, Hkv, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g).requires_grad_() for h in (H, Hkv, Hkv)]


def outputs_and_grads(fn, q, k, v, grad, **kw):
    out = fn(q, k, v, **kw)
    return out.detach(), torch.autograd.grad(out, (q, k, v), grad)


@pytest.mark.parametrize("B,T,W,S,H,Hkv,D", [(2, 37, 8, 4, 4, 2, 16), (1, 70, 16, 0, 2, 2, 24),
                                             (1, 130, 7, 3, 3, 1, 16), (2, 9, 8, 2, 2, 1, 8)])
def test_interpreted_kernel_equals_the_definition(interp, B, T, W, S, H, Hkv, D):
    q, k, v = random_qkv(B, H, Hkv, T, D, seed=T + W)
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1))
    want, want_grads = outputs_and_grads(window_attention_reference, q, k, v, grad, window=W, sinks=S, scale=0.3)
    got, got_grads = outputs_and_grads(interp.window_attention_triton, q, k, v, grad, window=W, sinks=S, scale=0.3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=f"d{name}")


def test_interpreted_kernel_packed_documents_and_left_padding(interp):
    W, S = 6, 2
    cu = torch.tensor([0, 9, 10, 41, 50])
    q, k, v = random_qkv(1, 2, 1, 50, 16, seed=5)
    grad = torch.randn(1, 2, 50, 16, generator=torch.Generator().manual_seed(2))
    got, got_grads = outputs_and_grads(interp.window_attention_triton, q, k, v, grad, window=W, sinks=S,
                                       cu_seqlens=cu)
    want = torch.cat([window_attention_reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], W, S)
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    torch.testing.assert_close(got, want.detach(), atol=2e-5, rtol=1e-4)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    # the second row left-padded by 4: its tokens read only each other, its padding gives zeros
    rows = torch.randn(2, 2, 23, 16, generator=torch.Generator().manual_seed(4))
    out = interp.window_attention_triton(rows, rows, rows, W, S, starts=[0, 4])
    torch.testing.assert_close(out[0], window_attention_reference(rows[:1], rows[:1], rows[:1], W, S)[0],
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, :, 4:], window_attention_reference(
        rows[1:, :, 4:], rows[1:, :, 4:], rows[1:, :, 4:], W, S)[0], atol=2e-5, rtol=1e-4)
    assert not out[1, :, :4].any()


def test_interpreted_kernel_refuses_bad_settings(interp):
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="sinks must be between 0 and the window"):
        interp.window_attention_triton(q, q, q, 4, 5)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        interp.window_attention_triton(q, q[:, :2], q[:, :2], 4)
