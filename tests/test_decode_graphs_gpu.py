"""Decode steps replayed from CUDA graphs (hybridize/arch/decode_graphs.py) on a GPU, skipped without CUDA: the
replayed steps give the eager steps' logits (bf16, batch 1 and 4 with left padding, past the sparse layers' dense
length and several compressed-key windows), `generate` gives the same tokens with the switch on and off, and
`reorder_cache` / `batch_select_indices`, a second generation and replaced weights keep it so."""

from __future__ import annotations

import pytest
import torch

from helpers import GPU_SPARSE, cache_of, gpu_llama, left_padded_prompts
from hybridize.arch.decode_graphs import WARMUP_STEPS
from hybridize.convert.build import build_hybrid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 48  # three compressed-key windows (stride 16) and a coarse one (stride 64) fill on the way
TOL = 1e-2  # relative; the replayed kernels are the eager ones, so this is far above what is expected (0)


def _model(types=("lightning", "sparse", "lightning", "sparse"), dtype=torch.bfloat16):
    return build_hybrid(gpu_llama(), list(types), **GPU_SPARSE).to("cuda", dtype)


def _cuda_prompts(lengths, seed):
    return tuple(t.cuda() for t in left_padded_prompts(lengths, seed))


def _step(model, token, cache, graphs: bool):
    model.config.decode_cuda_graphs = graphs
    return model(token, cache=cache, use_cache=True).logits.float()


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _compare_steps(model, eager, graphed, tokens):
    """Teacher-forced steps (the same tokens for both caches): eager and replayed logits agree at every step."""
    for i in range(tokens.shape[1]):
        a = _step(model, tokens[:, i : i + 1], eager, graphs=False)
        b = _step(model, tokens[:, i : i + 1], graphed, graphs=True)
        assert _rel(b, a) <= TOL, (i, _rel(b, a))
        assert torch.equal(a.argmax(-1), b.argmax(-1)), i


def _assert_close_caches(a, b):
    assert a.seq_len == b.seq_len
    for i, kind in enumerate(a.layer_types):
        if kind == "linear_attention":
            assert _rel(b.states[i], a.states[i]) <= TOL, i
        else:
            assert _rel(b.keys[i].float(), a.keys[i].float()) <= TOL, i


@pytest.mark.parametrize("lengths", [(300,), (300, 517, 260, 411)], ids=["batch1", "batch4-left-padded"])
@pytest.mark.parametrize("types", [("lightning", "sparse", "lightning", "sparse"),
                                   ("sparse", "lightning", "sparse", "lightning")], ids=["LSLS", "SLSL"])
def test_gpu_replayed_steps_match_eager_steps(lengths, types):
    model = _model(types)
    ids, mask = _cuda_prompts(lengths, seed=len(lengths))
    tokens = torch.randint(3, 97, (len(lengths), STEPS), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        eager = cache_of(model(ids, attention_mask=mask, use_cache=True))
        graphed = cache_of(model(ids, attention_mask=mask, use_cache=True))
        _compare_steps(model, eager, graphed, tokens)
    _assert_close_caches(eager, graphed)
    assert model.decode_graphs.paths["graph"] == STEPS - WARMUP_STEPS, model.decode_graphs.refusals
    assert min(lengths) + STEPS > 4 * 64  # beyond dense_len and top-k blocks: the sparse decode kernels ran


def test_gpu_generate_gives_the_same_tokens_with_graphs_on_and_off():
    model = _model()
    ids, mask = _cuda_prompts((150, 333, 201, 290), seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.config.decode_cuda_graphs = False
        off = model.generate(ids, **kw)
        model.config.decode_cuda_graphs = True
        on = model.generate(ids, **kw)
        again = model.generate(ids, **kw)  # a new cache through the graphs already recorded
        steps = on.shape[1] - ids.shape[1] - 1  # decode steps of one generation (after the prefill)
        assert model.decode_graphs.paths["graph"] == 2 * steps - WARMUP_STEPS, model.decode_graphs.refusals
        assert torch.equal(on, off) and torch.equal(again, off)
        # beam search reorders the cache every step: its states are copied into the buffers again each time
        beams_on = model.generate(ids, num_beams=3, **kw)
        model.config.decode_cuda_graphs = False
        beams_off = model.generate(ids, num_beams=3, **kw)
        assert torch.equal(beams_on, beams_off)


def test_gpu_graphs_follow_reorder_cache_and_batch_select_indices():
    model = _model()
    ids, mask = _cuda_prompts((300, 517, 260, 411), seed=7)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        eager = cache_of(model(ids, attention_mask=mask, use_cache=True))
        graphed = cache_of(model(ids, attention_mask=mask, use_cache=True))
        _compare_steps(model, eager, graphed, torch.randint(3, 97, (4, 12), generator=g).cuda())
        perm = torch.tensor([3, 1, 0, 2], device="cuda")
        for cache in (eager, graphed):
            cache.reorder_cache(perm)
        _compare_steps(model, eager, graphed, torch.randint(3, 97, (4, 12), generator=g).cuda())
        keep = torch.tensor([0, 2], device="cuda")
        for cache in (eager, graphed):
            cache.batch_select_indices(keep)
        _compare_steps(model, eager, graphed, torch.randint(3, 97, (2, 12), generator=g).cuda())
    _assert_close_caches(eager, graphed)
    assert model.decode_graphs.paths["graph"] == 12 - WARMUP_STEPS + 12 + 12 - WARMUP_STEPS


def test_gpu_replaced_weights_or_hooks_are_never_replayed_stale():
    model = _model()
    ids, mask = _cuda_prompts((200, 260), seed=9)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw)  # records the graphs
        assert model.decode_graphs.paths["graph"] > 0
        g = torch.Generator().manual_seed(3)
        new = torch.randn(model.lm_head.weight.shape, generator=g).to("cuda", torch.bfloat16) * 0.5
        model.lm_head.weight = torch.nn.Parameter(new)  # a new tensor: the recorded lm_head read the old one
        model.config.decode_cuda_graphs = True
        on = model.generate(ids, **kw)
        model.config.decode_cuda_graphs = False
        off = model.generate(ids, **kw)
        assert torch.equal(on, off)
        model.config.decode_cuda_graphs = True
        calls = []
        handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
        before = model.decode_graphs.paths["graph"]
        hooked = model.generate(ids, **kw)
        handle.remove()
        # the hook ran at each prefill chunk and at every (eager) step, and no step replayed a graph
        chunks = -(-ids.shape[1] // GPU_SPARSE["prefill_chunk_size"])
        assert model.decode_graphs.paths["graph"] == before
        assert len(calls) == chunks + hooked.shape[1] - ids.shape[1] - 1
        assert torch.equal(hooked, off)
