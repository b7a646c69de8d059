"""The window branch's Triton kernel against the definition (kernels/window_reference.py): forward and every gradient
on random inputs, odd lengths and head sizes, GQA, no sinks, packed documents and left-padded rows; the sinks (read in
the kernels) of many short documents in one block, sinks that are band keys of earlier queries, in the last block.

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


@pytest.mark.parametrize("cu,starts", [(None, None), ([0, 700, 701, 3000], None), (None, [0, 1500])])
def test_sink_rows_sum_many_readers_in_float32(cu, starts):
    """Thousands of tokens read the same sink rows: their gradient, given bf16 keys, is the float32 sum of every
    reader's (gather's own backward adds them one by one in bf16)."""
    from hybridize.kernels.window_reference import sequence_begin
    from hybridize.kernels.window_triton import _SinkRows

    B, T, S = (1 if cu else 2), 3000, 4
    x = torch.randn(B, 3, T, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).requires_grad_()
    begin = sequence_begin(B, T, "cpu", cu_seqlens=cu, starts=starts).expand(B, T).contiguous()
    rows = _SinkRows.apply(x, begin, S)
    grad = torch.randn(rows.shape, generator=torch.Generator().manual_seed(4))
    (got,) = torch.autograd.grad(rows, x, grad)
    pos = (begin[..., None] + torch.arange(S)).clamp(max=T - 1).view(B, 1, T * S, 1).expand(B, 3, -1, 8)
    x64 = x.detach().double().requires_grad_()
    want_rows = x64.gather(2, pos).view(rows.shape)
    (want,) = torch.autograd.grad(want_rows, x64, grad.double())
    assert rows.dtype == torch.float32 and torch.equal(rows, want_rows.float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=0.0, rtol=2 ** -8)  # bf16's rounding of the exact sum


def test_interpreted_kernel_scores_far_sinks_by_their_own_pair(interp):
    """window_reference's `far`: the sinks read from beyond the reach scored q_far . k_far, forward and every
    gradient (q_far and k_far included), packed documents too."""
    W, S, R = 8, 3, 17
    g = torch.Generator().manual_seed(9)
    q, k, v, qf, kf = [torch.randn(1, h, 60, 16, generator=g).requires_grad_() for h in (4, 2, 2, 4, 2)]
    grad = torch.randn(1, 4, 60, 16, generator=g)
    for cu in (None, torch.tensor([0, 30, 31, 60])):
        got = interp.window_attention_triton(q, k, v, W, S, 0.3, cu_seqlens=cu, far=(R, qf, kf))
        if cu is None:
            want = window_attention_reference(q, k, v, W, S, 0.3, far=(R, qf, kf))
        else:
            want = torch.cat([window_attention_reference(*(x[:, :, a:b] for x in (q, k, v)), W, S, 0.3,
                                                         far=(R, qf[:, :, a:b], kf[:, :, a:b]))
                              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        for name, a, b in zip(["q", "k", "v", "q_far", "k_far"], torch.autograd.grad(got, (q, k, v, qf, kf), grad),
                              torch.autograd.grad(want, (q, k, v, qf, kf), grad)):
            torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=f"d{name}")


def definition_by_sequence(q, k, v, W, S, cu=None, starts=None):
    """window_attention_reference on each sequence alone (packed documents, or each row's tokens after its left
    padding, whose queries get zeros), put back in place: differentiable, so its gradients are the definition's."""
    if cu is not None:
        pieces = [(slice(None), a, b) for a, b in zip(cu[:-1], cu[1:])]
    else:
        pieces = [(slice(r, r + 1), st, q.shape[2]) for r, st in enumerate(starts or [0] * q.shape[0])]
    out = torch.zeros_like(q)
    for rows, a, b in pieces:
        out = out.index_put((torch.arange(q.shape[0])[rows, None, None], torch.arange(q.shape[1])[None, :, None],
                             torch.arange(a, b)[None, None, :]),
                            window_attention_reference(*(x[rows, :, a:b] for x in (q, k, v)), W, S, 0.3))
    return out


def check_sinks_case(interp, B, T, W, S, H, Hkv, D, cu=None, starts=None):
    q, k, v = random_qkv(B, H, Hkv, T, D, seed=T * 31 + W * 7 + S)
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(W + S))
    got, got_grads = outputs_and_grads(interp.window_attention_triton, q, k, v, grad, window=W, sinks=S, scale=0.3,
                                       cu_seqlens=None if cu is None else torch.tensor(cu), starts=starts)
    want, want_grads = outputs_and_grads(definition_by_sequence, q, k, v, grad, W=W, S=S, cu=cu, starts=starts)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("cu,W,S", [([0, 3, 23, 24, 69, 78], 4, 4), ([0, 3, 23, 24, 69, 78], 5, 1),
                                    ([0, 3, 23, 24, 69, 78], 6, 3), ([0, 3, 23, 24, 69, 78], 8, 2),
                                    ([0, 3, 23, 24, 69, 78], 7, 4), ([0, 5, 6, 13, 16], 2, 2),
                                    ([0, 5, 6, 13, 16], 3, 1)])
def test_interpreted_kernel_sinks_of_short_documents_sharing_a_block(interp, cu, W, S):
    """Packed documents shorter and longer than the window, several of them reading their own sinks in one block of
    queries (64 rows, and 16 when T <= 16): the kernels' sink tile holds each one's, every sink row's dk / dv sums
    its readers across documents and blocks."""
    check_sinks_case(interp, 1, cu[-1], W, S, 2, 1, 16, cu=cu)


@pytest.mark.parametrize("B,T,W,S,cu,starts", [
    (1, 150, 70, 4, None, None),  # sink 3 lies in the band of queries 3..72 and is a sink of 73 on
    (1, 150, 70, 70, None, None),  # sinks == window, 70 sink keys: two tiles
    (1, 150, 20, 20, None, None),  # up to 4 sequences x 20 sinks per block: two tiles
    (1, 150, 6, 3, [0, 131, 150], None),  # the last document's sinks and readers in the last, partial block
    (2, 150, 4, 4, None, [0, 140]),  # left padding up to the last block: its sinks there, the padding zeros
    (2, 40, 3, 3, None, [0, 9]),  # window < block, sinks == window, left padding
])
def test_interpreted_kernel_sinks_across_and_inside_blocks(interp, B, T, W, S, cu, starts):
    """Sinks that are also band keys of earlier queries, windows wider and narrower than a block, sinks in the last
    partial block, left padding: forward and every gradient against the definition."""
    check_sinks_case(interp, B, T, W, S, 2, 1, 8, cu=cu, starts=starts)


def test_sink_tile_bound_holds_for_any_packing():
    """The kernels give each block of queries one sink tile of `_sink_tiles`'s count of sequences: no packing puts
    more sequences with rows reading sinks into one block (documents of window + 1 tokens, the tightest, included)."""
    from hybridize.kernels.window_reference import sequence_begin
    from hybridize.kernels.window_triton import _sink_tiles

    g = torch.Generator().manual_seed(0)
    for BM in (16, 64):
        for W in (1, 2, 3, 5, 8, 15, 16, 31, 62, 63, 64):
            nseg, _ = _sink_tiles(BM, W, 1)
            n = 3 * BM // (W + 1) + 3
            packings = [[W + 1] * n, [W + 1, 1] * n, [1] * 3 + [W + 1] * n]
            packings += [torch.randint(1, 2 * W + 3, (60,), generator=g).tolist() for _ in range(20)]
            for lengths in packings:
                cu = torch.tensor([0] + lengths).cumsum(0)
                T = int(cu[-1])
                most = 0
                for shift in range(min(BM, W + 2)):  # the documents at every offset against the blocks
                    begin = sequence_begin(1, T + shift, "cpu", cu_seqlens=torch.cat([cu[:1], cu + shift]))[0]
                    reading = torch.arange(T + shift) - begin >= W
                    most = max(most, *(len(set(begin[a:a + BM][reading[a:a + BM]].tolist()))
                                       for a in range(0, T + shift, BM)))
                assert most <= nseg, (BM, W, lengths)
                if lengths == [W + 1] * n:
                    assert most == nseg  # and reached
