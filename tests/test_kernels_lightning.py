"""Lightning Triton kernels against the PyTorch reference: forward, every gradient, varlen packs, the decode step.

On CPU the kernels run under the Triton interpreter in float32 on tiny shapes: a private copy of kernels/
(lightning_triton.py and the files it imports) is loaded with TRITON_INTERPRET=1 set only while it loads (triton
reads the flag when a kernel is decorated), so the rest of the suite keeps the normal, compiled kernels. On a GPU the same checks run in
bf16 on larger shapes, plus the whole model through the kernel path against the reference path.
"""

from __future__ import annotations

import dataclasses

import functools
from pathlib import Path

import pytest
import torch

from helpers import TINY_SPARSE, cache_of, load_interpreted, tiny_llama
from hybridize.kernels.lightning_reference import (
    lightning_attn_chunked,
    lightning_attn_recurrent,
    lightning_attn_step,
)

pytest.importorskip("triton")

KERNEL_FILE = Path(__file__).resolve().parents[1] / "kernels" / "lightning_triton.py"


@pytest.fixture(scope="module")
def interp():
    """kernels/lightning_triton.py under the Triton interpreter."""
    return load_interpreted(KERNEL_FILE)


@pytest.fixture(scope="module")
def interp_norm_gate():
    """kernels/norm_gate_triton.py under the Triton interpreter."""
    return load_interpreted(KERNEL_FILE.with_name("norm_gate_triton.py"))


@pytest.fixture(scope="module")
def interp_norm_rope():
    """kernels/norm_rope_triton.py under the Triton interpreter."""
    return load_interpreted(KERNEL_FILE.with_name("norm_rope_triton.py"))


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _inputs(B, H, T, Dk, Dv, n_states, with_init, dtype, device):
    q = torch.randn(B, H, T, Dk, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, H, T, Dk, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, H, T, Dv, device=device).to(dtype).requires_grad_()
    # decays from fast (g ~ 0.37) to slow (g ~ 0.99), like SALA's ALiBi slopes
    log_decay = -torch.exp(torch.empty(H, device=device).uniform_(-4.5, 0.0))
    s0 = torch.randn(n_states, H, Dk, Dv, device=device).requires_grad_() if with_init else None
    return q, k, v, log_decay, s0


def _run_both(fn, q, k, v, log_decay, s0, cu_seqlens, grad_final=True, chunk=64, **options):
    """Forward both ways, then the gradients of one random linear function of (o, final state)."""
    leaves = [q, k, v] + ([s0] if s0 is not None else [])
    o, f = fn(q, k, v, log_decay, None, s0, True, chunk, cu_seqlens, **options)
    o_ref, f_ref = lightning_attn_chunked(q, k, v, log_decay, None, s0, True, chunk, cu_seqlens)
    do = torch.randn_like(o_ref, dtype=torch.float32).to(o.dtype)
    df = torch.randn_like(f_ref)
    loss = (o.float() * do.float()).sum() + ((f * df).sum() if grad_final else 0.0)
    loss_ref = (o_ref.float() * do.float()).sum() + ((f_ref * df).sum() if grad_final else 0.0)
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    names = ["dq", "dk", "dv", "d_initial_state"][: len(leaves)]
    errs = {"o": rel(o, o_ref), "final_state": rel(f, f_ref)}
    errs.update({n: rel(g, r) for n, g, r in zip(names, grads, grads_ref)})
    assert o.dtype == q.dtype and f.dtype == torch.float32
    return errs


# ---------------------------------------------------------------------------------------------------------------------
# CPU, Triton interpreter, float32
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,H,T,Dk,Dv,with_init,grad_final",
    [
        (2, 2, 77, 16, 32, True, True),  # two full chunks and a partial one
        (1, 3, 50, 32, 16, False, True),  # shorter than one chunk
        (2, 1, 29, 48, 16, True, False),  # head dim not a power of two; no gradient through the final state
        (1, 2, 128, 16, 16, True, True),  # exact multiple of the chunk
    ],
)
def test_chunked_matches_reference_interpreted(interp, seed, B, H, T, Dk, Dv, with_init, grad_final):
    args = _inputs(B, H, T, Dk, Dv, B, with_init, torch.float32, "cpu")
    errs = _run_both(interp.lightning_attn_chunked_triton, *args, None, grad_final)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize(
    "B,H,T,Dk,Dv,with_init,chunk,target,inter_first",
    [
        (2, 2, 300, 16, 16, True, 16, 12, False),  # 19 chunks -> 3 segments of 7, 7, 5 chunks, the last chunk partial
        (1, 1, 130, 32, 16, False, 32, 10 ** 6, False),  # one chunk per segment
        (2, 2, 300, 16, 16, True, 16, 12, True),  # the carried-state term computed first
    ],
)
def test_segmented_scan_matches_reference_interpreted(interp, seed, B, H, T, Dk, Dv, with_init, chunk, target,
                                                      inter_first):
    # long sequences are cut into segments that run in parallel, each started from the sums of those before it
    # (the two-pass forward; lookback=False)
    cfg = interp.ScanConfig(target_programs=target, min_segment_chunks=1, lookback=False, inter_first=inter_first)
    assert interp._segments(T, chunk, B * H, cfg, False)[0] > 1
    args = _inputs(B, H, T, Dk, Dv, B, with_init, torch.float32, "cpu")
    errs = _run_both(interp.lightning_attn_chunked_triton, *args, None, chunk=chunk, config=cfg, bwd_config=cfg)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize(
    "B,H,T,Dk,Dv,with_init,chunk,seg_tokens,publish,fwd_chunk",
    [
        (2, 2, 300, 16, 32, True, 16, 48, True, None),  # 19 chunks -> 7 segments of 3, the last partial; 2 col tiles
        (1, 2, 130, 32, 16, False, 32, 32, False, None),  # one chunk a segment; look-backs sum own sums to segment 0
        (1, 1, 45, 16, 16, True, 16, 64, True, None),  # a single segment
        (1, 2, 100, 16, 16, True, 16, 64, True, 32),  # forward chunks of 32, backward chunks of 16
    ],
)
def test_lookback_forward_matches_reference_interpreted(interp, seed, B, H, T, Dk, Dv, with_init, chunk, seg_tokens,
                                                        publish, fwd_chunk):
    # the one-kernel forward: each segment sums its own k^T v, looks back over the segments before it, then walks
    # its chunks; the backward's dq scan starts each segment from the state the forward saved for it
    cfg = interp.ScanConfig(lookback=True, segment_tokens=seg_tokens, block_c=16, publish_inclusive=publish,
                            chunk=fwd_chunk)
    bwd = interp.ScanConfig(block_c=16, target_programs=10 ** 6, min_segment_chunks=1)
    args = _inputs(B, H, T, Dk, Dv, B, with_init, torch.float32, "cpu")
    errs = _run_both(interp.lightning_attn_chunked_triton, *args, None, chunk=chunk, config=cfg, bwd_config=bwd)
    assert max(errs.values()) < 1e-5, errs


def test_lookback_publishes_every_segment_interpreted(interp, seed):
    # every program takes exactly one ticket, and every segment but the last publishes the state at its end
    q, k, v, ld, _ = _inputs(1, 3, 200, 16, 32, 1, False, torch.float32, "cpu")
    cfg = interp.ScanConfig(lookback=True, segment_tokens=32, block_c=16)
    with torch.no_grad():
        o, _, pref, (nseg, segc), flags = interp._ticketed_forward(
            q, k, v, ld.float(), init=None, scale=0.25, store_final=False, save_prefix=True, chunk=16, config=cfg)
    programs = 3 * 2 * nseg  # heads x column tiles x segments
    assert (nseg, segc) == (7, 2) and flags[-1].item() == programs
    per_program = flags[:-1].view(3 * 2, nseg)
    assert (per_program[:, :-1] == 2).all() and (per_program[:, -1] == 0).all()
    # the saved entering states are the reference's states at the segment starts
    for s in range(1, nseg):
        _, state = lightning_attn_chunked(q[:, :, : 32 * s], k[:, :, : 32 * s], v[:, :, : 32 * s], ld, 0.25, None,
                                          True, 16)
        assert rel(pref[:, :, s], state) < 1e-5


@pytest.mark.parametrize(
    "B,H,T,Dk,Dv,with_init,chunk,seg_tokens,lead,publish,fwd_chunk,decay_v",
    [
        (2, 2, 300, 16, 32, True, 16, 48, 1, True, None, False),  # 7 segments of 3 chunks, the last partial; 2 col tiles
        (2, 2, 300, 16, 32, True, 16, 48, 1, True, None, True),  # the same, the state update decaying v
        (1, 2, 130, 32, 16, False, 32, 32, 0, False, None, True),  # sums right before their walks; look-backs over sums
        (1, 3, 211, 16, 16, True, 16, 32, 2, True, None, False),  # sums two segments ahead (4-deep sum pipeline)
        (1, 1, 45, 16, 16, True, 16, 64, 1, True, None, True),  # a single segment: walks only
        (1, 2, 100, 16, 16, False, 16, 32, 50, True, 32, False),  # every sum before every walk; forward chunks of 32
        (1, 2, 150, 24, 40, True, 16, 48, 1, True, None, True),  # head dims that are not powers of two
    ],
)
def test_overlap_forward_matches_reference_interpreted(interp, seed, B, H, T, Dk, Dv, with_init, chunk, seg_tokens,
                                                       lead, publish, fwd_chunk, decay_v):
    # the one-launch forward with sum and walk programs from one ticket counter; the backward's dq scan starts each
    # segment from the state the forward saved for it
    cfg = interp.ScanConfig(overlap=True, segment_tokens=seg_tokens, lead=lead, block_c=16, publish_inclusive=publish,
                            chunk=fwd_chunk, decay_v=decay_v, sum_stages=4 if lead == 2 else None)
    bwd = interp.ScanConfig(block_c=16, target_programs=10 ** 6, min_segment_chunks=1)
    args = _inputs(B, H, T, Dk, Dv, B, with_init, torch.float32, "cpu")
    errs = _run_both(interp.lightning_attn_chunked_triton, *args, None, chunk=chunk, config=cfg, bwd_config=bwd)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("lead", [0, 1, 3])
def test_overlap_runs_every_program_once_interpreted(interp, seed, lead):
    # nseg - 1 sum programs and nseg walk programs per (head, column tile), one ticket each; every walk but the last
    # publishes the state at its segment's end, and the saved entering states are the reference's
    q, k, v, ld, s0 = _inputs(1, 3, 200, 16, 32, 1, True, torch.float32, "cpu")
    cfg = interp.ScanConfig(overlap=True, segment_tokens=32, block_c=16, lead=lead)
    with torch.no_grad():
        o, final, pref, (nseg, segc), flags = interp._ticketed_forward(
            q, k, v, ld.float(), init=s0, scale=0.25, store_final=True, save_prefix=True, chunk=16, config=cfg)
    assert (nseg, segc) == (7, 2) and flags[-1].item() == 3 * 2 * (2 * nseg - 1)
    per_program = flags[:-1].view(3 * 2, nseg)
    assert (per_program[:, :-1] == 2).all() and (per_program[:, -1] == 0).all()
    o_ref, f_ref = lightning_attn_chunked(q, k, v, ld, 0.25, s0, True, 16)
    assert rel(o, o_ref) < 1e-5 and rel(final, f_ref) < 1e-5
    assert torch.equal(pref[:, :, 0], s0)
    for s in range(1, nseg):
        _, state = lightning_attn_chunked(q[:, :, : 32 * s], k[:, :, : 32 * s], v[:, :, : 32 * s], ld, 0.25, s0,
                                          True, 16)
        assert rel(pref[:, :, s], state) < 1e-5


@pytest.mark.parametrize("overlap", [True, False])
def test_few_walks_cut_shorter_segments_interpreted(interp, seed, overlap):
    # 2 heads x 19 chunks in one 1024-token segment would be 2 walks; with target_programs 8 the forward cuts 4
    # segments of 5 chunks instead (never below min_segment_chunks), the dq scan follows them, and the function stays
    cfg = interp.ScanConfig(overlap=overlap, lookback=not overlap, segment_tokens=1024, block_c=16, target_programs=8)
    args = _inputs(1, 2, 300, 16, 16, 1, True, torch.float32, "cpu")
    with torch.no_grad():
        *_, (nseg, segc), _ = interp._ticketed_forward(*args[:3], args[3].float(), init=args[4], scale=0.25,
                                                       store_final=True, save_prefix=True, chunk=16, config=cfg)
    assert (nseg, segc) == (4, 5)
    enough = dataclasses.replace(cfg, target_programs=2)  # 2 walks already: the segment as long as configured
    with torch.no_grad():
        *_, kept, _ = interp._ticketed_forward(*args[:3], args[3].float(), init=args[4], scale=0.25,
                                               store_final=True, save_prefix=True, chunk=16, config=enough)
    assert kept == (1, 64)
    bwd = interp.ScanConfig(block_c=16, target_programs=10 ** 6, min_segment_chunks=1)
    errs = _run_both(interp.lightning_attn_chunked_triton, *args, None, chunk=16, config=cfg, bwd_config=bwd)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("with_init", [False, True])
def test_varlen_packs_match_reference_interpreted(interp, seed, with_init):
    cu = torch.tensor([0, 13, 80, 81, 150])  # a one-token document and chunk-crossing ones
    args = _inputs(1, 2, 150, 16, 16, 4, with_init, torch.float32, "cpu")
    errs = _run_both(interp.lightning_attn_chunked_triton, *args, cu)
    assert max(errs.values()) < 1e-5, errs


def test_varlen_documents_do_not_share_state_interpreted(interp, seed):
    q, k, v, ld, _ = _inputs(1, 2, 90, 16, 16, 1, False, torch.float32, "cpu")
    with torch.no_grad():
        packed, _ = interp.lightning_attn_chunked_triton(q, k, v, ld, cu_seqlens=torch.tensor([0, 40, 90]))
        alone, _ = interp.lightning_attn_chunked_triton(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], ld)
    assert rel(packed[:, :, 40:], alone) < 1e-6


@pytest.mark.parametrize("lookback", [True, False])
def test_non_contiguous_inputs_interpreted(interp, seed, lookback):
    # the model hands over (B, T, H, D) projections viewed as (B, H, T, D); outputs and gradients come back in that
    # memory order, so that the model's transpose + reshape of o is a view, not a copy
    x = torch.randn(3, 2, 37, 3, 16, requires_grad=True)  # (qkv, B, T, H, D)
    q, k, v = (t.transpose(1, 2) for t in x)
    ld = -torch.rand(3) - 0.05
    cfg = interp.ScanConfig(lookback=lookback, segment_tokens=16, block_c=16, target_programs=10 ** 6,
                            min_segment_chunks=1)
    o, f = interp.lightning_attn_chunked_triton(q, k, v, ld, 0.3, None, True, 16, config=cfg, bwd_config=cfg)
    o_ref, f_ref = lightning_attn_chunked(q, k, v, ld, 0.3, None, True, 16)
    assert rel(o, o_ref) < 1e-5 and rel(f, f_ref) < 1e-5
    assert o.transpose(1, 2).is_contiguous()
    do = torch.randn_like(o_ref)
    grads = torch.autograd.grad((o * do).sum(), [q, k, v])
    grads_ref = torch.autograd.grad((o_ref * do).sum(), [q, k, v])
    for g, r in zip(grads, grads_ref):
        assert rel(g, r) < 1e-5 and g.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("B,Tn,Dk,Dv", [(1, 1, 16, 32), (3, 2, 32, 16), (2, 3, 48, 32)])
def test_decode_step_matches_reference_interpreted(interp, seed, B, Tn, Dk, Dv):
    H = 2
    q, k, v = torch.randn(B, H, Tn, Dk), torch.randn(B, H, Tn, Dk), torch.randn(B, H, Tn, Dv)
    ld = -torch.rand(H) - 0.01
    state = torch.randn(B, H, Dk, Dv)
    state_ref = state.clone()
    o = interp.lightning_attn_step_triton(q, k, v, ld, state, 0.25)
    o_ref = lightning_attn_step(q, k, v, ld, state_ref, 0.25)
    assert rel(o, o_ref) < 1e-5 and rel(state, state_ref) < 1e-5
    # the out-of-place form leaves its initial state alone
    before = state.clone()
    o2, s2 = interp.lightning_attn_recurrent_triton(q, k, v, ld, 0.25, state, True)
    o2_ref, s2_ref = lightning_attn_recurrent(q, k, v, ld, 0.25, before, True)
    assert torch.equal(state, before)
    assert rel(o2, o2_ref) < 1e-5 and rel(s2, s2_ref) < 1e-5


def test_bad_arguments_are_refused(interp):
    q = torch.randn(1, 2, 8, 16)
    ld = -torch.rand(2)
    with pytest.raises(ValueError, match="chunk_size"):
        interp.lightning_attn_chunked_triton(q, q, q, ld, chunk_size=48)
    with pytest.raises(ValueError, match="ScanConfig.chunk"):
        interp.lightning_attn_chunked_triton(q, q, q, ld, config=interp.ScanConfig(chunk=48))
    with pytest.raises(ValueError, match="walk_qk_hint"):
        interp.lightning_attn_chunked_triton(q, q, q, ld, config=interp.ScanConfig(walk_qk_hint="evict_normal"))
    with pytest.raises(ValueError, match="log_decay"):
        interp.lightning_attn_chunked_triton(q, q, q, -torch.rand(3))
    with pytest.raises(ValueError, match="initial_state"):
        interp.lightning_attn_chunked_triton(q, q, q, ld, initial_state=torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match="float32"):
        interp.lightning_attn_step_triton(q[:, :, :1], q[:, :, :1], q[:, :, :1], ld, torch.zeros(1, 2, 16, 16,
                                                                                               dtype=torch.float64))


def _norm_gate_case(shape, with_gate, dtype, device):
    from hybridize.arch.modeling_hybridize import HybridRMSNorm

    N = shape[-1]
    norm = HybridRMSNorm(N, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(N) * 0.5 + 1.0)
    o = (torch.randn(*shape, device=device) * 3).to(dtype).requires_grad_()
    z = torch.randn(*shape, device=device).to(dtype).requires_grad_() if with_gate else None
    return norm, o, z


def _norm_gate_errors(fn, norm, o, z):
    """The fused kernel against the model's own HybridRMSNorm (and sigmoid gate): output and gradients."""
    y = fn(o, z, norm.weight, norm.variance_epsilon)
    y_ref = norm(o) if z is None else torch.sigmoid(z) * norm(o)
    dy = torch.randn_like(y_ref)
    leaves = [o, norm.weight] + ([z] if z is not None else [])
    g = torch.autograd.grad((y.float() * dy.float()).sum(), leaves)
    g_ref = torch.autograd.grad((y_ref.float() * dy.float()).sum(), leaves)
    errs = {"y": rel(y, y_ref)}
    errs.update({n: rel(a, b) for n, a, b in zip(["do", "dw", "dz"], g, g_ref)})
    return errs


@pytest.mark.parametrize("shape,with_gate,programs", [((2, 37, 48), True, 1024), ((5, 576), True, 1024),
                                                      ((3, 11, 40), False, 1024), ((2, 70, 48), True, 3)])
def test_norm_gate_matches_model_interpreted(interp_norm_gate, seed, shape, with_gate, programs):
    # programs=3: each backward program walks several row blocks and sums its share of dw
    norm, o, z = _norm_gate_case(shape, with_gate, torch.float32, "cpu")
    fn = functools.partial(interp_norm_gate.rmsnorm_gate_triton, max_programs=programs)
    errs = _norm_gate_errors(fn, norm, o, z)
    assert max(errs.values()) < 1e-5, errs


def test_norm_gate_refuses_bad_shapes(interp_norm_gate):
    o = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        interp_norm_gate.rmsnorm_gate_triton(o, o, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="z must match"):
        interp_norm_gate.rmsnorm_gate_triton(o, o[:, :4], torch.ones(8), 1e-6)


def _norm_rope_case(B, T, H, D, cos_batch, rope, x_dtype, w_dtype, device):
    """x (B, T, H, D), the model's q_norm module, RoPE tables (cos_batch, T, D) from random positions (or None)."""
    from hybridize.arch.modeling_hybridize import HybridRMSNorm

    norm = HybridRMSNorm(D, eps=1e-5).to(device=device, dtype=w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D) * 0.5 + 1.0)
    x = (torch.randn(B, T, H, D, device=device) * 3).to(x_dtype).requires_grad_()
    cos = sin = None
    if rope:
        pos = torch.randint(0, 5000, (cos_batch, T), device=device).float()
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device).float() / D))
        emb = torch.cat((pos[..., None] * inv, pos[..., None] * inv), -1)
        cos, sin = emb.cos(), emb.sin()
    return norm, x, cos, sin


def _norm_rope_model(norm, x, cos, sin, out_dtype):
    """What the Lightning layer computed before the fused kernel: its norm module, the transpose, apply_rope, the
    cast to the value dtype."""
    from hybridize.arch.modeling_hybridize import apply_rope

    y = norm(x).transpose(1, 2)
    return (y if cos is None else apply_rope(y, cos, sin)).to(out_dtype)


def _norm_rope_errors(fn, norm, x, cos, sin, out_dtype):
    """The fused kernel against the model's composition: output, dx and dw."""
    y = fn(x, norm.weight, norm.variance_epsilon, cos, sin, out_dtype)
    y_ref = _norm_rope_model(norm, x, cos, sin, out_dtype)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and y.is_contiguous()
    dy = torch.randn_like(y_ref.float())
    g = torch.autograd.grad((y.float() * dy).sum(), [x, norm.weight])
    g_ref = torch.autograd.grad((y_ref.float() * dy).sum(), [x, norm.weight])
    return {"y": rel(y, y_ref), "dx": rel(g[0], g_ref[0]), "dw": rel(g[1], g_ref[1])}


@pytest.mark.parametrize("B,T,H,D,cos_batch,rope,programs", [(2, 7, 3, 16, 2, True, 1024), (2, 9, 3, 16, 1, True, 3),
                                                             (1, 5, 2, 12, 1, False, 1024), (3, 9, 1, 20, 3, True, 2)])
def test_norm_rope_matches_model_interpreted(interp_norm_rope, seed, B, T, H, D, cos_batch, rope, programs):
    # D = 12 and 20: half-widths that are not powers of two (masked lanes); programs 2-3: each backward program
    # walks several row blocks and sums its share of dw
    norm, x, cos, sin = _norm_rope_case(B, T, H, D, cos_batch, rope, torch.float32, torch.float32, "cpu")
    fn = functools.partial(interp_norm_rope.norm_rope_triton, max_programs=programs)
    errs = _norm_rope_errors(fn, norm, x, cos, sin, torch.float32)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_norm_rope_reference_is_the_model_composition(seed, x_dtype, w_dtype):
    from hybridize.kernels.norm_rope_triton import norm_rope_reference

    norm, x, cos, sin = _norm_rope_case(2, 37, 3, 16, 2, True, x_dtype, w_dtype, "cpu")
    with torch.no_grad():
        assert torch.equal(norm_rope_reference(x, norm.weight, norm.variance_epsilon, cos, sin, torch.bfloat16),
                           _norm_rope_model(norm, x, cos, sin, torch.bfloat16))


def test_norm_rope_refuses_bad_shapes(interp_norm_rope):
    x = torch.randn(2, 5, 3, 8)
    cos = torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="D even"):
        interp_norm_rope.norm_rope_triton(torch.randn(2, 5, 3, 7), torch.ones(7), 1e-6, None, None, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        interp_norm_rope.norm_rope_triton(x, torch.ones(6), 1e-6, cos, cos, torch.float32)
    with pytest.raises(ValueError, match="together"):
        interp_norm_rope.norm_rope_triton(x, torch.ones(8), 1e-6, cos, None, torch.float32)
    with pytest.raises(ValueError, match="cos/sin"):
        interp_norm_rope.norm_rope_triton(x, torch.ones(8), 1e-6, cos[:, :4], cos[:, :4], torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: bf16 and the model's dispatch
# ---------------------------------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


def _kernels():
    from hybridize.kernels import lightning_triton

    return lightning_triton


@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 5e-3), (torch.float32, 3e-3)])
@pytest.mark.parametrize("B,H,T,D,with_init", [(2, 4, 1000, 128, True), (1, 3, 333, 64, False), (2, 2, 200, 80, True)])
def test_chunked_matches_reference_gpu(seed, dtype, tol, B, H, T, D, with_init):
    args = _inputs(B, H, T, D, D, B, with_init, dtype, "cuda")
    errs = _run_both(_kernels().lightning_attn_chunked_triton, *args, None)
    assert max(errs.values()) < tol, errs


def _long_segmented_forward(lt, cfg):
    """A bf16 8-head sequence of 8191 tokens through the ticketed one-launch forward `cfg` picks: outputs and
    gradients vs the reference, and o vs the two-pass forward; returns (segments, tickets taken)."""
    args = _inputs(1, 8, 8191, 128, 128, 1, True, torch.bfloat16, "cuda")
    errs = _run_both(lt.lightning_attn_chunked_triton, *args, None, config=cfg)
    assert max(errs.values()) < 1e-2, errs
    q, k, v, ld, _ = args
    with torch.no_grad():
        o, _, _, (nseg, _), flags = lt._ticketed_forward(q, k, v, ld.float(), init=None, scale=0.1,
                                                         store_final=False, save_prefix=False, chunk=64, config=cfg)
        o_two_pass, _ = lt.lightning_attn_chunked_triton(q, k, v, ld, 0.1, config=lt.ScanConfig(lookback=False))
    assert rel(o, o_two_pass) < 1e-2
    return nseg, flags[-1].item()


@gpu
@pytest.mark.parametrize("seg_tokens,publish", [(128, True), (64, False), (512, True)])
def test_lookback_forward_long_gpu(seed, seg_tokens, publish):
    # many segments in flight at once: the look-back really waits on other programs here
    lt = _kernels()
    cfg = lt.ScanConfig(block_c=128, num_warps=8, num_stages=3, state_lowp=True, lookback=True,
                        segment_tokens=seg_tokens, publish_inclusive=publish)
    nseg, tickets = _long_segmented_forward(lt, cfg)
    assert tickets == 8 * nseg  # one ticket per program


@gpu
@pytest.mark.parametrize("seg_tokens,lead,block_c,num_warps,num_stages,publish,decay_v,sum_stages,qk_hint",
                         [(256, 1, 64, 4, 2, True, True, 4, "evict_first"),
                          (128, 0, 128, 8, 3, True, False, None, "evict_first"),
                          (512, 2, 64, 4, 2, True, False, None, ""),
                          (128, 1, 64, 4, 2, False, True, None, "evict_last")])
def test_overlap_forward_long_gpu(seed, seg_tokens, lead, block_c, num_warps, num_stages, publish, decay_v,
                                  sum_stages, qk_hint):
    # sums and walks of many segments in flight at once: the walks really wait on the sums here
    lt = _kernels()
    cfg = lt.ScanConfig(block_c=block_c, num_warps=num_warps, num_stages=num_stages, state_lowp=True, overlap=True,
                        segment_tokens=seg_tokens, lead=lead, publish_inclusive=publish, decay_v=decay_v,
                        sum_stages=sum_stages, walk_qk_hint=qk_hint)
    nseg, tickets = _long_segmented_forward(lt, cfg)
    assert tickets == 8 * (128 // block_c) * (2 * nseg - 1)  # one ticket per program


@gpu
def test_varlen_matches_reference_gpu(seed):
    cu = torch.tensor([0, 100, 101, 700, 2049], device="cuda")
    args = _inputs(1, 4, 2049, 128, 128, 4, True, torch.bfloat16, "cuda")
    errs = _run_both(_kernels().lightning_attn_chunked_triton, *args, cu)
    assert max(errs.values()) < 1e-2, errs


@gpu
@pytest.mark.parametrize("B,Tn", [(1, 1), (8, 1), (64, 1), (8, 4)])
def test_decode_step_matches_reference_gpu(seed, B, Tn):
    H, D = 32, 128
    q, k, v = (torch.randn(B, H, Tn, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ld = -torch.exp(torch.empty(H, device="cuda").uniform_(-4.5, 0.0))
    state = torch.randn(B, H, D, D, device="cuda")
    state_ref = state.clone()
    o = _kernels().lightning_attn_step_triton(q, k, v, ld, state)
    o_ref = lightning_attn_step(q, k, v, ld, state_ref)
    assert rel(o, o_ref) < 1e-2 and rel(state, state_ref) < 1e-5


@gpu
@pytest.mark.parametrize("shape,with_gate", [((3, 1000, 4096), True), ((2, 333, 576), False)])
def test_norm_gate_matches_model_gpu(seed, shape, with_gate):
    from hybridize.kernels.norm_gate_triton import rmsnorm_gate_triton

    norm, o, z = _norm_gate_case(shape, with_gate, torch.bfloat16, "cuda")
    norm = norm.to(torch.bfloat16)
    errs = _norm_gate_errors(rmsnorm_gate_triton, norm, o, z)
    assert max(errs.values()) < 2e-2, errs


@gpu
@pytest.mark.parametrize("B,T,H,D,cos_batch,w_dtype", [(2, 1000, 9, 64, 1, torch.float32),
                                                       (1, 333, 4, 128, 1, torch.bfloat16),
                                                       (3, 77, 5, 48, 3, torch.float32)])
def test_norm_rope_matches_model_gpu(seed, B, T, H, D, cos_batch, w_dtype):
    # fp32 weight on bf16 x: training under autocast; bf16 weight: a bf16 model (the rounded path)
    from hybridize.kernels.norm_rope_triton import norm_rope_triton

    norm, x, cos, sin = _norm_rope_case(B, T, H, D, cos_batch, True, torch.bfloat16, w_dtype, "cuda")
    errs = _norm_rope_errors(norm_rope_triton, norm, x, cos, sin, torch.bfloat16)
    assert max(errs.values()) < 2e-2, errs


@gpu
def test_model_logits_same_through_kernels_and_reference(seed, monkeypatch):
    from hybridize.arch import ops
    from hybridize.convert.build import build_hybrid

    # Lightning layers only: this compares our kernels, not whichever sparse path the model takes
    model = build_hybrid(tiny_llama(), ["lightning"] * 4, **TINY_SPARSE).cuda()
    ids = torch.randint(3, 97, (2, 150), device="cuda")
    steps = torch.randint(3, 97, (2, 5), device="cuda")

    def run():
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache = cache_of(out)
            logits = [out.logits]
            for i in range(steps.shape[1]):
                logits.append(model(steps[:, i : i + 1], cache=cache, use_cache=True).logits)
        return torch.cat(logits, 1)

    assert ops._LIGHTNING_TRITON
    kernel = run()
    monkeypatch.setattr(ops, "_LIGHTNING_TRITON", False)
    monkeypatch.setattr(ops, "_NORM_ROPE_TRITON", False)
    monkeypatch.setattr(ops, "_NORM_GATE_TRITON", False)
    reference = run()
    # float32 model: the kernels' tensor-core products run in tf32
    assert rel(kernel, reference) < 3e-3
