"""Sliding-window softmax attention with attention sinks: the blocked O(T W) form equals the definition (the whole
mask) on random inputs, forward and backward, for odd lengths, lengths inside one window, GQA and no sinks; and it
reads exactly the keys the definition names (a key outside them cannot change the output)."""

from __future__ import annotations

import pytest
import torch

from hybridize.kernels.window_reference import window_attention, window_attention_reference


@pytest.mark.parametrize("T,W,S,H,Hkv", [(37, 8, 4, 4, 2), (8, 8, 4, 2, 2), (5, 8, 2, 2, 1), (64, 16, 0, 4, 4),
                                         (65, 16, 16, 2, 1), (100, 7, 3, 3, 3)])
def test_blocked_window_attention_equals_the_definition(T, W, S, H, Hkv):
    g = torch.Generator().manual_seed(T * 31 + W)
    q = torch.randn(2, H, T, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, T, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, T, 16, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, H, T, 16, generator=g, dtype=torch.float64)
    outs, grads = [], []
    for fn in (window_attention_reference, window_attention):
        out = fn(q, k, v, W, S, scale=0.3)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, (q, k, v), grad))
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)


def test_a_query_reads_the_sinks_and_its_window_and_nothing_else():
    T, W, S = 40, 6, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    base = window_attention(q, k, v, W, S)
    i = 30  # reads keys 0-2 (sinks) and 25-30 (its window)
    for j, read in ((0, True), (2, True), (3, False), (24, False), (25, True), (30, True), (31, False)):
        v2 = v.clone()
        v2[0, 0, j] += 10.0
        changed = not torch.allclose(window_attention(q, k, v2, W, S)[0, 0, i], base[0, 0, i])
        assert changed == read, j
    # with the window covering the whole sequence it is plain causal attention
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(window_attention(q, k, v, T, S), full)


def test_bad_settings_are_refused_with_their_name():
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="window must be at least 1"):
        window_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="sinks must be between 0 and the window"):
        window_attention(q, q, q, 4, 5)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        window_attention(q, q[:, :2], q[:, :2], 4)


def test_packed_documents_and_left_padded_rows_each_read_only_their_own_tokens():
    g = torch.Generator().manual_seed(3)
    W, S = 5, 2
    lengths = [7, 1, 12, 4]
    T = sum(lengths)
    q = torch.randn(1, 2, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 7, 8, 20, 24])
    packed = window_attention(q, k, v, W, S, cu_seqlens=cu)
    alone = torch.cat([window_attention_reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], W, S)
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2)
    torch.testing.assert_close(packed, alone)
    grads = torch.autograd.grad(packed.sum(), (q, k, v))
    assert all(torch.isfinite(x).all() for x in grads)
    # two rows, the second left-padded by 3: its output is its unpadded sequence's, zeros where it is padding
    rows = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64)
    out = window_attention(rows, rows, rows, W, S, starts=[0, 3])
    torch.testing.assert_close(out[0], window_attention_reference(rows[:1], rows[:1], rows[:1], W, S)[0])
    torch.testing.assert_close(out[1, :, 3:], window_attention_reference(rows[1:, :, 3:], rows[1:, :, 3:],
                                                                         rows[1:, :, 3:], W, S)[0])
    assert not out[1, :, :3].any()
    with pytest.raises(ValueError, match="packed documents"):
        window_attention(rows, rows, rows, W, S, cu_seqlens=torch.tensor([0, 11]))


def _far_inputs(B, H, Hkv, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, dtype=torch.float64, requires_grad=True)
            for h in (H, Hkv, Hkv, H, Hkv)]


def test_far_sinks_are_scored_by_their_own_pair_beyond_the_reach_in_every_form():
    """`far = (reach, q_far, k_far)`: the definition scores a sink read from more than `reach` back as q_far . k_far
    (checked against the softmax written out); the blocked form and the cache form equal it, forward and backward
    (q_far and k_far included), with packed documents and left padding; a reach past the row changes nothing."""
    from hybridize.kernels.window_reference import window_attention_at

    W, S, R, T = 8, 3, 19, 61
    q, k, v, qf, kf = _far_inputs(2, 4, 2, T, 16, seed=3)
    far = (R, qf, kf)
    want = window_attention_reference(q, k, v, W, S, 0.3, far=far)
    # written out for one query far from its sinks (position 40) in row 1, head 3 (key/value head 1)
    i, kk, vv = 40, k[1, 1], v[1, 1]
    keys = list(range(S)) + list(range(i - W + 1, i + 1))
    logit = torch.stack([(qf[1, 3, i] @ kf[1, 1, j] if j < S else q[1, 3, i] @ kk[j]) * 0.3 for j in keys])
    torch.testing.assert_close(want[1, 3, i], torch.softmax(logit, 0) @ vv[keys])
    assert not torch.allclose(want, window_attention_reference(q, k, v, W, S, 0.3))
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v, qf, kf), grad)
    got = window_attention(q, k, v, W, S, 0.3, far=far)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v, qf, kf), grad), want_grads):
        torch.testing.assert_close(a, b)
    pos = torch.arange(T)[None].expand(2, T)
    last = window_attention_at(q[:, :, -6:], k, v, pos[:, -6:], pos, W, S, 0.3, far=(R, qf[:, :, -6:], kf))
    torch.testing.assert_close(last, want[:, :, -6:])
    torch.testing.assert_close(window_attention(q, k, v, W, S, 0.3, far=(T, qf, kf)),
                               window_attention_reference(q, k, v, W, S, 0.3))
    cu = torch.tensor([0, 9, 10, 41, 61])
    packed = window_attention(q[:1], k[:1], v[:1], W, S, 0.3, cu_seqlens=cu, far=(R, qf[:1], kf[:1]))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        doc = window_attention_reference(*(x[:1, :, a:b] for x in (q, k, v)), W, S, 0.3,
                                         far=(R, qf[:1, :, a:b], kf[:1, :, a:b]))
        torch.testing.assert_close(packed[:, :, a:b], doc)
    padded = window_attention(q, k, v, W, S, 0.3, starts=[0, 13], far=far)
    row = window_attention_reference(*(x[1:, :, 13:] for x in (q, k, v)), W, S, 0.3,
                                     far=(R, qf[1:, :, 13:], kf[1:, :, 13:]))
    torch.testing.assert_close(padded[1:, :, 13:], row)
    assert padded[1:, :, :13].abs().max() == 0
    with pytest.raises(ValueError, match="twice the window"):
        window_attention(q, k, v, W, S, far=(2 * W - 1, qf, kf))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("form", ["sdpa", "triton"])
@pytest.mark.parametrize("reach", [0, 600])
def test_gpu_window_attention_equals_the_definition_forward_and_backward(form, dtype, tol, reach):
    """On CUDA, the blocked SDPA form (SDPA picks its own kernel) and the Triton kernel (kernels/window_triton.py,
    what the model takes on CUDA): the same values and gradients as the definition, packed documents included (the
    window is the recipe's 256, the documents cross several blocks), with far sinks past a reach of 600 too."""
    from hybridize.kernels.window_triton import window_attention_triton

    fn = window_attention if form == "sdpa" else window_attention_triton
    g = torch.Generator().manual_seed(7)
    q, k, v, qf, kf = (torch.randn(1, h, 1500, 64, generator=g).cuda().to(dtype).requires_grad_()
                       for h in (6, 2, 2, 6, 2))
    inputs = (q, k, v, qf, kf) if reach else (q, k, v)
    cu = torch.tensor([0, 700, 1210, 1500], device="cuda")
    out = fn(q, k, v, 256, 4, cu_seqlens=cu, far=(reach, qf, kf) if reach else None)
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    ref_out, ref_grads = [], [torch.zeros_like(x, dtype=torch.float32) for x in inputs]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        piece = [x.detach()[:, :, a:b].float().requires_grad_() for x in inputs]
        far = (reach, piece[3], piece[4]) if reach else None
        o = window_attention_reference(*piece[:3], 256, 4, far=far)
        for acc, gr in zip(ref_grads, torch.autograd.grad(o.square().sum(), piece)):
            acc[:, :, a:b] = gr
        ref_out.append(o)
    ref = torch.cat(ref_out, 2)
    assert ((out.float() - ref).norm() / ref.norm()).item() <= tol
    for got, want in zip(grads, ref_grads):
        assert ((got.float() - want).norm() / want.norm()).item() <= 2 * tol
