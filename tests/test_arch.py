"""The hybrid architecture: parity with the source, Lightning forms, InfLLM-V2 selection, cache, export."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import TINY_SPARSE, cache_of, left_padded, tiny_llama
from hybridize.arch import HybridConfig, HybridForCausalLM
from hybridize.convert.build import build_hybrid
from hybridize.export import save_hybrid
from hybridize.kernels.lightning_reference import lightning_attn_chunked, lightning_attn_recurrent
from hybridize.kernels.sparse_reference import (coarse_compressed_keys, compress_keys, infllm_v2_attention,
                                               select_blocks)

HYBRID_TYPES = ["lightning", "sparse", "lightning", "sparse"]


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the source
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # MQA, GQA, MHA
@pytest.mark.parametrize("gates", [False, True])
def test_all_sparse_hybrid_reproduces_source_logits(kv_heads, gates):
    src = tiny_llama(num_kv_heads=kv_heads)
    hybrid = build_hybrid(src, ["sparse"] * 4, hype=False, output_gates=gates)
    ids = torch.randint(3, 97, (2, 45))
    with torch.no_grad():
        expected = src(ids).logits
        got = hybrid(ids, use_cache=False).logits
    assert (expected - got).abs().max().item() <= 1e-4


def test_hype_changes_sparse_layers_and_lightning_differs_from_attention():
    src = tiny_llama()
    ids = torch.randint(3, 97, (1, 30))
    with torch.no_grad():
        expected = src(ids).logits
        nope = build_hybrid(src, ["sparse"] * 4, hype=True, output_gates=False)(ids, use_cache=False).logits
        mixed = build_hybrid(src, HYBRID_TYPES, hype=False, output_gates=False)(ids, use_cache=False).logits
    assert (expected - nope).abs().max() > 1e-3  # NoPE really removes rotary embeddings
    assert (expected - mixed).abs().max() > 1e-3  # Lightning layers really replace attention


def test_lightning_layers_are_multi_head_with_expanded_kv():
    src = tiny_llama(num_kv_heads=2)
    hybrid = build_hybrid(src, HYBRID_TYPES)
    attn = hybrid.model.layers[0].self_attn
    src_k = src.model.layers[0].self_attn.k_proj.weight  # (2 * 16, 64)
    assert attn.k_proj.weight.shape == (4 * 16, 64)
    # head h of the Lightning layer is KV head h // 2 of the source
    for h in range(4):
        assert torch.equal(attn.k_proj.weight[h * 16 : (h + 1) * 16], src_k[(h // 2) * 16 : (h // 2 + 1) * 16])
    sparse = hybrid.model.layers[1].self_attn
    assert torch.equal(sparse.k_proj.weight, src.model.layers[1].self_attn.k_proj.weight)


@pytest.mark.parametrize("gates", [False, True])
def test_lightning_kv_heads_of_the_source_keep_the_function_with_fewer_weights(tmp_path, gates):
    """`lightning_kv_heads="source"` keeps the source's 2 K/V heads in the Lightning layers and shares each among its
    2 query heads at run time: the same logits as the expanded weights (full forward, cached decode, the exported
    folder), 2 x (4 - 2) x 16 x 64 fewer weights per Lightning layer, and the shared heads train as one."""
    src = tiny_llama(num_kv_heads=2)
    expanded = build_hybrid(src, HYBRID_TYPES, output_gates=gates, **TINY_SPARSE)
    shared = build_hybrid(src, HYBRID_TYPES, output_gates=gates, lightning_kv_heads="source", **TINY_SPARSE)
    attn = shared.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * 16, 64)
    assert torch.equal(attn.k_proj.weight, src.model.layers[0].self_attn.k_proj.weight)
    lightning_layers = HYBRID_TYPES.count("lightning")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(expanded) - n(shared) == lightning_layers * 2 * (4 - 2) * 16 * 64
    ids = torch.randint(3, 97, (2, 70))
    with torch.no_grad():
        a = expanded(ids, use_cache=False).logits
        b = shared(ids, use_cache=False).logits
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        prompt = ids[:, :30]
        out = shared(prompt, use_cache=True)
        cache = cache_of(out)
        steps = [shared(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, 70)]
    torch.testing.assert_close(torch.cat([out.logits] + steps, 1), b, rtol=1e-4, atol=1e-4)
    folder = tmp_path / "shared"
    save_hybrid(shared, folder)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert loaded.config.lightning_kv_heads == "source"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, b, rtol=1e-5, atol=1e-5)
    shared.train()
    shared(ids[:1, :20], use_cache=False).logits.square().mean().backward()
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0


def test_lightning_kv_heads_is_validated():
    with pytest.raises(ValueError, match="lightning_kv_heads"):
        HybridConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                     lightning_kv_heads="group")


# ---------------------------------------------------------------------------------------------------------------------
# Lightning attention
# ---------------------------------------------------------------------------------------------------------------------
def _lightning_inputs(B, H, T, D, requires_grad=False):
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    log_decay = -torch.rand(H, dtype=torch.float64) * 0.5 - 0.01
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, log_decay


@pytest.mark.parametrize("T", [1, 63, 64, 65, 150])
def test_lightning_chunked_equals_recurrent(seed, T):
    q, k, v, ld = (x.float() for x in _lightning_inputs(2, 3, T, 16))
    init = torch.randn(2, 3, 16, 16)
    o1, s1 = lightning_attn_chunked(q, k, v, ld, initial_state=init, output_final_state=True, chunk_size=64)
    o2, s2 = lightning_attn_recurrent(q, k, v, ld, initial_state=init, output_final_state=True)
    assert (o1 - o2).norm() / o2.norm() <= 1e-5
    assert (s1 - s2).norm() / s2.norm() <= 1e-5


def test_lightning_matches_explicit_sum(seed):
    """o_t = scale * sum_{s<=t} g^(t-s) (q_t . k_s) v_s, computed without any recurrence."""
    B, H, T, D = 1, 2, 37, 8
    q, k, v, ld = (x.float() for x in _lightning_inputs(B, H, T, D))
    o, _ = lightning_attn_chunked(q, k, v, ld, chunk_size=16)
    t = torch.arange(T)
    dist = (t.view(-1, 1) - t.view(1, -1)).float()
    weights = torch.exp(ld.view(H, 1, 1) * dist.clamp(min=0)) * (dist >= 0)
    expected = ((q @ k.transpose(-1, -2)) * D**-0.5 * weights) @ v
    assert (o - expected).norm() / expected.norm() <= 1e-5


def test_lightning_chunked_gradients_match_recurrent(seed):
    q, k, v, ld = _lightning_inputs(1, 2, 77, 8, requires_grad=True)
    init = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, 77, 8, dtype=torch.float64)
    grads = []
    for fn in (lightning_attn_chunked, lightning_attn_recurrent):
        o, s = fn(q, k, v, ld, initial_state=init, output_final_state=True)
        ((o * weight).sum() + s.sum()).backward()
        grads.append([x.grad.clone() for x in (q, k, v, init)])
        for x in (q, k, v, init):
            x.grad = None
    for g1, g2 in zip(*grads):
        assert (g1 - g2).norm() / g2.norm() <= 1e-5


def test_lightning_packed_documents_do_not_share_state(seed):
    q, k, v, ld = (x.float() for x in _lightning_inputs(1, 2, 50, 8))
    cu = torch.tensor([0, 13, 14, 50])
    packed, states = lightning_attn_chunked(q, k, v, ld, output_final_state=True, chunk_size=16, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, s = lightning_attn_recurrent(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], ld, output_final_state=True)
        assert torch.allclose(packed[:, :, a:b], alone, rtol=1e-5, atol=1e-5)
        assert torch.allclose(states[i], s[0], rtol=1e-5, atol=1e-5)


def test_sala_decay_schedule():
    from hybridize.arch.modeling_hybridize import lightning_log_decay

    config = HybridConfig(num_hidden_layers=4, num_attention_heads=8, hidden_size=64)
    ld = lightning_log_decay(config, 0)
    assert torch.allclose(ld, torch.tensor([-(2.0 ** (-8 * (h + 1) / 8)) for h in range(8)]))
    assert torch.equal(ld, lightning_log_decay(config, 3))  # SALA: the same in every layer
    layerwise = HybridConfig(num_hidden_layers=4, num_attention_heads=8, hidden_size=64, lightning_decay="layerwise")
    assert not torch.equal(lightning_log_decay(layerwise, 0), lightning_log_decay(layerwise, 3))


# ---------------------------------------------------------------------------------------------------------------------
# InfLLM-V2 sparse attention: brute force from the spec
# ---------------------------------------------------------------------------------------------------------------------
def brute_force_selection(q, k, t, *, block, ckernel, cstride, topk, init, local, dense_len, scale):
    """Selected blocks of query position t for each KV group, written as plainly as the spec reads.
    Pooling is literally "max-pool, kernel 5, stride 4, padding 1" over compressed keys (for block = 4 * stride
    and kernel = 2 * stride, the compressed keys overlapping a block)."""
    Hq, Hkv = q.shape[0], k.shape[0]
    group = Hq // Hkv
    n_blocks = t // block + 1
    Tk = k.shape[1]
    nc = (Tk - ckernel) // cstride + 1 if Tk >= ckernel else 0
    ck = [[k[h, i * cstride : i * cstride + ckernel].mean(0) for i in range(nc)] for h in range(Hkv)]
    visible = [i for i in range(nc) if i * cstride + ckernel - 1 <= t]
    result = []
    for g in range(Hkv):
        if t + 1 < dense_len or n_blocks <= topk:
            result.append(set(range(n_blocks)))
            continue
        score = {i: 0.0 for i in visible}
        for h in range(g * group, (g + 1) * group):
            logits = torch.stack([q[h, t] @ ck[g][i] * scale for i in visible])
            probs = torch.softmax(logits, 0)
            for i, p in zip(visible, probs.tolist()):
                score[i] += p
        pool_k, pool_s, pool_p = 5, block // cstride, 1
        block_score = {}
        for j in range(n_blocks):
            window = range(j * pool_s - pool_p, j * pool_s - pool_p + pool_k)
            vals = [score[i] for i in window if i in score]
            block_score[j] = max(vals) if vals else float("-inf")
        own = t // block
        forced = {j for j in range(n_blocks) if j < init or j > own - local}
        rest = sorted((j for j in range(n_blocks) if j not in forced), key=lambda j: (-block_score[j], -j))
        result.append(forced | set(rest[: topk - len(forced)]))
    return result


@pytest.mark.parametrize("Hq,Hkv,Tk", [(4, 2, 150), (4, 1, 131), (2, 2, 97)])
def test_sparse_selection_matches_brute_force(seed, Hq, Hkv, Tk):
    p = dict(block=16, ckernel=8, cstride=4, topk=4, init=1, local=2, dense_len=40)
    D = 8
    scale = D**-0.5
    q = torch.randn(1, Hq, Tk, D)
    k = torch.randn(1, Hkv, Tk, D)
    v = torch.randn(1, Hkv, Tk, D)
    pos = torch.arange(Tk)
    n_blocks = -(-Tk // 16)
    mask = select_blocks(q, compress_keys(k, 8, 4), pos, n_blocks, scale=scale, block_size=16, kernel=8, stride=4,
                         topk=4, init_blocks=1, local_blocks=2, dense_len=40)
    out = infllm_v2_attention(q, k, v, pos, scale=scale, block_size=16, kernel=8, stride=4, topk=4,
                              init_blocks=1, local_blocks=2, dense_len=40)
    for t in range(Tk):
        expected_blocks = brute_force_selection(q[0], k[0], t, scale=scale, **p)
        for g in range(Hkv):
            got = set(torch.nonzero(mask[0, g, t]).flatten().tolist())
            assert got == expected_blocks[g], (t, g)
            # Output: attention restricted to exactly the tokens of those blocks, causal.
            tokens = [s for s in range(t + 1) if s // 16 in expected_blocks[g]]
            for h in range(g * (Hq // Hkv), (g + 1) * (Hq // Hkv)):
                w = torch.softmax(torch.stack([q[0, h, t] @ k[0, g, s] * scale for s in tokens]), 0)
                expected = (w.view(-1, 1) * v[0, g, tokens]).sum(0)
                assert torch.allclose(out[0, h, t], expected, atol=1e-5), (t, h)
    # The selection really is sparse for late queries (the test would be vacuous otherwise).
    assert mask[0, :, -1].sum(-1).max().item() == 4 < n_blocks


def test_sparse_with_topk_covering_everything_is_dense_nope_attention(seed):
    Hq, Hkv, Tk, D = 4, 2, 133, 8
    q, k, v = torch.randn(1, Hq, Tk, D), torch.randn(1, Hkv, Tk, D), torch.randn(1, Hkv, Tk, D)
    out = infllm_v2_attention(q, k, v, torch.arange(Tk), block_size=16, kernel=8, stride=4, topk=9,
                              init_blocks=1, local_blocks=2, dense_len=1)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    causal = torch.ones(Tk, Tk, dtype=torch.bool).tril()
    logits = (q @ kk.transpose(-1, -2)) * D**-0.5
    expected = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1) @ vv
    assert torch.allclose(out, expected, atol=1e-5)


def test_sparse_model_layer_uses_selection_beyond_dense_len():
    src = tiny_llama()
    ids = torch.randint(3, 97, (1, 90))
    with torch.no_grad():
        dense = build_hybrid(src, ["sparse"] * 4, hype=False, output_gates=False)(ids, use_cache=False).logits
        sparse = build_hybrid(src, ["sparse"] * 4, hype=False, output_gates=False, **TINY_SPARSE)(
            ids, use_cache=False).logits
    # identical while every query is shorter than dense_len, different once selection drops blocks
    assert torch.allclose(dense[:, :23], sparse[:, :23], atol=1e-5)
    assert (dense[:, 70:] - sparse[:, 70:]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Generation cache
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hybrid():
    src = tiny_llama()
    return build_hybrid(src, HYBRID_TYPES, **TINY_SPARSE)


def test_cache_prefill_and_steps_match_full_forward(tiny_hybrid):
    torch.manual_seed(1)
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (7, 19, 12)]
    ids, mask = left_padded(prompts)
    steps = torch.randint(3, 97, (3, 40))
    full_ids = torch.cat([ids, steps], 1)
    full_mask = torch.cat([mask, torch.ones_like(steps)], 1)
    with torch.no_grad():
        full = tiny_hybrid(full_ids, attention_mask=full_mask, use_cache=False).logits
        out = tiny_hybrid(ids, attention_mask=mask, use_cache=True)
        cache = cache_of(out)
        logits = [out.logits]
        for i in range(40):
            m = full_mask[:, : ids.shape[1] + i + 1]
            step = tiny_hybrid(steps[:, i : i + 1], attention_mask=m, cache=cache, use_cache=True)
            logits.append(step.logits)
    inc = torch.cat(logits, 1)
    real = full_mask.bool()
    rel = (inc[real] - full[real]).norm() / full[real].norm()
    assert rel <= 1e-4
    # the sparse path and compressed-key appends really ran: the last sequence is 59 real tokens long
    assert cache.seq_len == full_ids.shape[1]
    sparse_layer = 1
    counts = cache.compressed_count(full_ids.shape[1])
    assert counts == [(n + 40 - 8) // 4 + 1 for n in (7, 19, 12)]
    assert cache.ckeys[sparse_layer].shape[2] == max(counts)
    assert cache.lightning_state(0).dtype == torch.float32
    # the coarse keys (the default normaliser's), appended step by step, equal those rebuilt from each sequence's
    # compressed keys at the end
    assert tiny_hybrid.config.sparse_coarse_normalizer
    counts2 = cache.coarse_count(full_ids.shape[1])
    assert max(counts2) > 0
    for b, (n, n2) in enumerate(zip(counts, counts2)):
        rebuilt = coarse_compressed_keys(cache.ckeys[sparse_layer][b : b + 1, :, :n], 8, 4, 32, 16)[0]
        assert rebuilt.shape[1] == n2
        assert torch.equal(cache.coarse_keys(sparse_layer)[b, :, :n2], rebuilt)


def test_decode_steps_append_in_place_without_copying_the_cache(tiny_hybrid):
    """Keys/values live in buffers with headroom: a decode step writes its position in place (the buffer's storage
    stays the same) until the headroom is used up, and what attention reads is exactly the tokens seen so far."""
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (2, 30))
    sparse_layer = 1
    with torch.no_grad():
        out = tiny_hybrid(ids, use_cache=True)
        cache = cache_of(out)
        buf = cache._kbuf[sparse_layer]
        assert buf.shape[2] > 30  # headroom beyond the prompt
        ptrs, nxt = set(), out.logits[:, -1:].argmax(-1)
        seen = [ids]
        for _ in range(20):
            step = tiny_hybrid(nxt, cache=cache, use_cache=True)
            seen.append(nxt)
            nxt = step.logits[:, -1:].argmax(-1)
            ptrs.add(cache._kbuf[sparse_layer].data_ptr())
        assert ptrs == {buf.data_ptr()}
        assert cache.keys[sparse_layer].shape[2] == 50
        # the cached keys equal the keys a fresh full forward computes for the same 50 tokens
        fresh = tiny_hybrid(torch.cat(seen, 1), use_cache=True)
        fresh_cache = cache_of(fresh)
        torch.testing.assert_close(cache.keys[sparse_layer], fresh_cache.keys[sparse_layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.ckeys[sparse_layer], fresh_cache.ckeys[sparse_layer], rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_a_sequence(tiny_hybrid):
    torch.manual_seed(2)
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (5, 30, 17)]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        batched = tiny_hybrid(ids, attention_mask=mask, use_cache=False).logits
        for i, p in enumerate(prompts):
            alone = tiny_hybrid(torch.tensor([p]), use_cache=False).logits[0]
            assert torch.allclose(batched[i, -len(p):], alone, atol=1e-4)


def test_generate_batched_greedy_sampling_and_beam(tiny_hybrid):
    torch.manual_seed(3)
    tiny_hybrid.generation_config.pad_token_id = 0
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (4, 11, 8)]
    ids, mask = left_padded(prompts)
    greedy = tiny_hybrid.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    for i, p in enumerate(prompts):
        alone = tiny_hybrid.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False)[0, len(p):].tolist()
        row = greedy[i, ids.shape[1]:].tolist()
        assert len(alone) >= 5
        assert row[: len(alone)] == alone and set(row[len(alone):]) <= {0}  # pad after an early EOS
    sampled = tiny_hybrid.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                                   top_k=10, num_return_sequences=2)
    assert sampled.shape == (6, ids.shape[1] + 10)
    beam_cached = tiny_hybrid.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3,
                                       do_sample=False)
    beam_uncached = tiny_hybrid.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3,
                                         do_sample=False, use_cache=False)
    assert torch.equal(beam_cached, beam_uncached)  # beam reordering of states and caches is right


def test_bad_attention_mask_is_refused(tiny_hybrid):
    ids = torch.randint(3, 97, (1, 6))
    with pytest.raises(ValueError, match="padding"):
        tiny_hybrid(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]]))


def test_training_forward_backward_reaches_every_parameter():
    src = tiny_llama(layers=4)
    hybrid = build_hybrid(src, HYBRID_TYPES, **TINY_SPARSE).train()
    ids = torch.randint(3, 97, (2, 70))
    out = hybrid(ids, labels=ids)
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    no_grad = [n for n, p in hybrid.named_parameters() if p.grad is None]
    assert no_grad == []


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------
def test_export_loads_without_hybridize_and_generates_the_same(tmp_path, tiny_hybrid):
    folder = tmp_path / "hybrid"
    save_hybrid(tiny_hybrid, folder)
    prompt = torch.randint(3, 97, (1, 9))
    expected = tiny_hybrid.generate(prompt, max_new_tokens=20, do_sample=False)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["hybridize"] = None  # any import of hybridize fails in this process
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "hybridize" not in type(model).__module__.split(".")[0]
        out = model.generate(torch.tensor({prompt.tolist()}), max_new_tokens=20, do_sample=False)
        print("TOKENS", out.tolist())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("TOKENS")][0]
    assert line == f"TOKENS {expected.tolist()}"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_hybridize.py", "configuration_hybridize.py",
            "lightning_reference.py", "sparse_reference.py"} <= names


def test_export_is_atomic(tmp_path, tiny_hybrid):
    folder = tmp_path / "out"
    save_hybrid(tiny_hybrid, folder)
    with pytest.raises(FileExistsError, match="--force"):
        save_hybrid(tiny_hybrid, folder)
    save_hybrid(tiny_hybrid, folder, force=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers == []


def test_config_roundtrip_and_validation(tmp_path):
    config = HybridConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          layer_types=["lightning", "sparse", "lightning"])
    config.save_pretrained(tmp_path)
    again = HybridConfig.from_pretrained(tmp_path)
    assert again.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert again.sparse_topk == 96 and again.sparse_dense_len == 8192 and again.hype is True
    with pytest.raises(ValueError, match="layer_types"):
        HybridConfig(num_hidden_layers=2, layer_types=["lightning"])
    with pytest.raises(ValueError, match="lightning_decay"):
        HybridConfig(num_hidden_layers=1, layer_types=["sparse"], lightning_decay="fast")
    model = HybridForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_autocast_bf16_forward_backward_keeps_one_dtype_in_the_mixers():
    """fp32 parameters under bf16 autocast: the fp32-weighted norms must not hand the kernels mixed dtypes."""
    hybrid = build_hybrid(tiny_llama(), HYBRID_TYPES, **TINY_SPARSE).train()
    seen = []
    import hybridize.arch.modeling_hybridize as modeling

    real_lightning, real_sparse = modeling.lightning_attention, modeling.sparse_attention

    def spy_lightning(q, k, v, *a, **kw):
        seen.append({q.dtype, k.dtype, v.dtype})
        return real_lightning(q, k, v, *a, **kw)

    def spy_sparse(q, k, v, *a, **kw):
        seen.append({q.dtype, k.dtype, v.dtype})
        return real_sparse(q, k, v, *a, **kw)

    modeling.lightning_attention, modeling.sparse_attention = spy_lightning, spy_sparse
    try:
        ids = torch.randint(3, 97, (1, 40))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = hybrid(ids, labels=ids).loss
        loss.backward()
    finally:
        modeling.lightning_attention, modeling.sparse_attention = real_lightning, real_sparse
    assert seen and all(s == {torch.bfloat16} for s in seen)


def test_chunked_prefill_equals_one_pass_and_generate_keeps_only_last_logits():
    src = tiny_llama()
    chunked = build_hybrid(src, HYBRID_TYPES, prefill_chunk_size=7, **TINY_SPARSE)
    whole = build_hybrid(src, HYBRID_TYPES, prefill_chunk_size=None, **TINY_SPARSE)
    torch.manual_seed(4)
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (23, 61, 40)]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        a = chunked(ids, attention_mask=mask, use_cache=True)
        b = whole(ids, attention_mask=mask, use_cache=False)
    real = mask.bool()
    assert (a.logits[real] - b.logits[real]).norm() / b.logits[real].norm() <= 1e-4
    cache = cache_of(a)
    assert cache.seq_len == ids.shape[1]
    seen = []
    hook = chunked.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    chunked.generation_config.pad_token_id = 0
    out = chunked.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    hook.remove()
    assert set(seen) == {1}  # generate never computes (T, vocab) logits for the prompt
    reference = whole.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, reference)
