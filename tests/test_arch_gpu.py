"""The hybrid model end to end on a GPU, through the Triton kernels (skipped without CUDA): a cached generation
(chunked prefill with left padding, then one token at a time) reproduces the full forward, and batched greedy
generation equals one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from helpers import GPU_SPARSE, cache_of, gpu_llama
from hybridize.convert.build import build_hybrid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(dtype):
    return build_hybrid(gpu_llama(), ["lightning", "sparse", "lightning", "sparse"], **GPU_SPARSE).to("cuda", dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-2), (torch.bfloat16, 6e-2)])
def test_gpu_cached_decoding_matches_full_forward(dtype, tol):
    model = _model(dtype)
    g = torch.Generator().manual_seed(11)
    lengths = (300, 517)
    T = max(lengths)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, 97, (n,), generator=g)
        mask[b, T - n:] = 1
    steps = torch.randint(3, 97, (2, 24), generator=g)
    full_ids = torch.cat([ids, steps], 1).cuda()
    full_mask = torch.cat([mask, torch.ones_like(steps)], 1).cuda()
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask, use_cache=False).logits.float()
        out = model(full_ids[:, :T], attention_mask=full_mask[:, :T], use_cache=True)  # 3 prefill chunks of 192
        cache, logits = cache_of(out), [out.logits.float()]
        for i in range(steps.shape[1]):
            step = model(full_ids[:, T + i : T + i + 1], attention_mask=full_mask[:, : T + i + 1], cache=cache,
                         use_cache=True)
            logits.append(step.logits.float())
    inc = torch.cat(logits, 1)
    real = full_mask.bool()
    rel = ((inc[real] - full[real]).norm() / full[real].norm()).item()
    assert rel <= tol, rel
    assert cache.keys[1].shape[2] == full_ids.shape[1]


def test_gpu_batched_greedy_generate_equals_one_prompt_at_a_time():
    model = _model(torch.float32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (150, 333)]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts]).cuda()
    mask = (ids != 0).long()
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)[:, T:]
        for b, p in enumerate(prompts):
            one = model.generate(torch.tensor([p]).cuda(), **kw)[:, len(p):]
            agree = (one[0] == batched[b]).float().mean().item()
            assert agree >= 0.9, (b, one, batched[b])  # fp32 on tensor cores: rare near-ties may flip late tokens


def test_gpu_model_through_kernels_matches_cpu_references():
    """The same weights on the CPU (plain PyTorch references: Lightning, sparse selection and attention, output norm
    and gate) and on the GPU (every Triton kernel, incl. the fused norm + gate): same logits up to TF32 rounding."""
    model = _model(torch.float32).cpu()
    ids = torch.randint(3, 97, (2, 333), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        got = model.cuda()(ids.cuda(), use_cache=False).logits.cpu()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= 2e-2, rel


def test_gpu_packed_training_step_with_host_offsets_never_waits():
    """The trainer hands packed documents' cu_seqlens over on the host (make_batch): the model copies them to the GPU
    itself, and its forward and backward run without one host synchronisation, giving what the same call with
    cu_seqlens on the GPU gives."""
    import numpy as np

    from hybridize.train.data import make_batch

    model = _model(torch.bfloat16).train()
    rng = np.random.default_rng(4)
    seqs = [(rng.integers(3, 97, 300).astype(np.int32), np.array([0, 90, 200])) for _ in range(2)]
    batch = make_batch(seqs, "cuda")
    assert batch["cu_seqlens"].device.type == "cpu" and batch["counted"] == 2 * (300 - 3)
    kw = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    want = model(**kw, cu_seqlens=batch["cu_seqlens"].cuda()).logits
    want.float().square().mean().backward()
    want_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = model(**kw, cu_seqlens=batch["cu_seqlens"]).logits
        got.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (got.float() - want.float()).abs().max() < 1e-2
    for p, g in zip(model.parameters(), want_grads):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert (p.grad.float() - g.float()).abs().max() <= 1e-2 * g.float().abs().max() + 1e-6
