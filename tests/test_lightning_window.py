"""The Lightning layers' softmax window branch (config.lightning_window): conversion, cache, calibration, export."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from helpers import TINY_SPARSE, cache_of, left_padded, tiny_llama
from hybridize.arch import HybridConfig
from hybridize.arch.cache_hybridize import HybridCache
from hybridize.convert.build import build_hybrid
from hybridize.export import save_hybrid
from hybridize.select.alignment import fit_output_norm
from hybridize.select.runner import LayerRunner, reference_hybrid

TYPES = ["lightning", "sparse", "lightning", "lightning"]


def _windowed_source(src, layers: set[int], window: int, sinks: int, name: str):
    """The source with its attention in `layers` cut to the first `sinks` and the last `window` keys (its own mask,
    written out here rather than taken from the code under test)."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        t = query.shape[2]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        allowed = j <= i
        if module.layer_idx in layers:
            allowed = allowed & ((i - j < window) | (j < sinks))
        scores = (query @ key.transpose(-1, -2)) * scaling
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (probs @ value).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attend)
    AttentionMaskInterface.register(name, lambda *a, **k: None)
    src.set_attn_implementation(name)
    return src


@pytest.mark.parametrize("kv_heads", ["query", "source"])
def test_a_window_covering_the_input_reproduces_the_source(kv_heads):
    src = tiny_llama()
    hybrid = build_hybrid(src, TYPES, hype=False, lightning_window=64, lightning_sinks=4, lightning_kv_heads=kv_heads)
    ids = torch.randint(3, 97, (2, 50))
    with torch.no_grad():
        assert (src(ids).logits - hybrid(ids, use_cache=False).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("window,sinks", [(8, 2), (13, 0), (5, 5)])
def test_a_fresh_conversion_is_the_source_with_its_attention_cut_to_the_window(window, sinks):
    """Every layer that becomes Lightning computes the source's attention over the sinks and the window; with the
    gates on, W_o is not doubled where the window branch bypasses the gate."""
    hybrid = build_hybrid(tiny_llama(), TYPES, hype=False, lightning_window=window, lightning_sinks=sinks)
    expected_model = _windowed_source(tiny_llama(), {0, 2, 3}, window, sinks, f"test_window_{window}_{sinks}")
    ids = torch.randint(3, 97, (2, 41))
    with torch.no_grad():
        expected = expected_model(ids).logits
        got = hybrid(ids, use_cache=False).logits
        cut_nowhere = tiny_llama()(ids).logits
    assert (expected - got).abs().max() <= 1e-4
    assert (cut_nowhere - got).abs().max() > 1e-2  # the window really cuts something at 41 tokens
    layer = hybrid.model.layers[0].self_attn
    assert layer.o_norm.weight.abs().max() == 0  # the recurrent branch starts at zero


def test_packed_documents_and_left_padding_read_their_own_sinks_and_window():
    hybrid = _trained_looking(build_hybrid(tiny_llama(), TYPES, lightning_window=6, lightning_sinks=2, **TINY_SPARSE))
    docs = [torch.randint(3, 97, (n,)) for n in (11, 30, 4)]
    with torch.no_grad():
        alone = [hybrid(d[None], use_cache=False).logits[0] for d in docs]
        packed = hybrid(torch.cat(docs)[None], cu_seqlens=torch.tensor([0, 11, 41, 45]), use_cache=False).logits[0]
        ids, mask = left_padded([d.tolist() for d in docs])
        padded = hybrid(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-4)
    for b, d in enumerate(docs):
        torch.testing.assert_close(padded[b, -len(d):], alone[b], rtol=1e-4, atol=1e-4)


def _trained_looking(hybrid):
    """Recurrent branches and gates away from their fresh values, so both branches shape every output."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in hybrid.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "o_norm"):
                attn.o_norm.weight.copy_(torch.rand(attn.o_norm.weight.shape, generator=g) + 0.5)
                attn.z_proj.weight.normal_(0.0, 0.05, generator=g)
    return hybrid


@pytest.mark.parametrize("chunk", [None, 16])
def test_cached_generation_equals_the_full_forward(chunk):
    """Left-padded prompts prefilled (in one pass, or in chunks longer than the window, which go through the store
    piece by piece) and decoded one token at a time give the full forward's logits; the store holds each row's sinks
    and its last `window` positions."""
    options = dict(TINY_SPARSE, prefill_chunk_size=chunk)
    hybrid = _trained_looking(build_hybrid(tiny_llama(), TYPES, lightning_window=8, lightning_sinks=2, **options))
    torch.manual_seed(1)
    lengths = (7, 37, 12)
    ids, mask = left_padded([torch.randint(3, 97, (n,)).tolist() for n in lengths])
    steps = torch.randint(3, 97, (3, 25))
    full_ids, full_mask = torch.cat([ids, steps], 1), torch.cat([mask, torch.ones_like(steps)], 1)
    with torch.no_grad():
        full = hybrid(full_ids, attention_mask=full_mask, use_cache=False).logits
        out = hybrid(ids, attention_mask=mask, use_cache=True)
        cache = cache_of(out)
        logits = [out.logits]
        for i in range(steps.shape[1]):
            m = full_mask[:, : ids.shape[1] + i + 1]
            logits.append(hybrid(steps[:, i: i + 1], attention_mask=m, cache=cache, use_cache=True).logits)
    real = full_mask.bool()
    inc = torch.cat(logits, 1)
    assert ((inc[real] - full[real]).norm() / full[real].norm()) <= 1e-4
    for b, n in enumerate(lengths):
        total = n + steps.shape[1]
        held = sorted(p for p in cache.window_store(0)[2][b].tolist() if p >= 0)
        assert held == [0, 1] + list(range(total - 8, total))
    assert cache.window_store(0)[0].shape[2] == 10  # constant size: sinks + window


def test_window_store_keeps_rows_apart_and_survives_batch_surgery():
    config = HybridConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, layer_types=["lightning"],
                          lightning_window=4, lightning_sinks=1)
    cache = HybridCache(config)
    k = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 9, 1)
    pos = torch.tensor([list(range(9)), [-1, -1, -1] + list(range(6))])
    cache.update_window(0, k, k + 100, pos)
    keys, values, held = cache.window_store(0)
    for b, want in enumerate(([0, 5, 6, 7, 8], [0, 2, 3, 4, 5])):
        kept = held[b] >= 0
        assert sorted(held[b][kept].tolist()) == want
        # each slot's key is the one written at its position
        for slot in kept.nonzero().flatten().tolist():
            column = int(held[b, slot]) + (0 if b == 0 else 3)
            assert keys[b, 0, slot, 0] == k[b, 0, column, 0] and values[b, 0, slot, 0] == k[b, 0, column, 0] + 100
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.window_store(0)[2][0], held[1])


def test_calibration_fits_the_recurrent_branch_to_what_the_window_leaves():
    src = tiny_llama()
    hybrid = build_hybrid(src, TYPES, lightning_window=6, lightning_sinks=2)
    runner = LayerRunner(reference_hybrid(src))
    ids = torch.randint(3, 97, (2, 48))
    ctx = runner.context(ids)
    x, target = next(iter(runner.attention_io(ids)))
    layer = hybrid.model.layers[0].self_attn
    with torch.no_grad():
        window_only = (layer(x, ctx) - target).pow(2).mean() / target.pow(2).mean()
        err = fit_output_norm(layer, x, ctx, target, per_channel=True)
        after = (layer(x, ctx) - target).pow(2).mean() / target.pow(2).mean()
    assert window_only > 1e-3  # the window leaves something to fit at 48 tokens
    assert err < window_only
    assert abs(float(after) - err) <= 1e-3 * max(err, 1e-6) + 1e-6  # the reported error is the whole layer's
    assert layer.o_norm.weight.abs().max() > 0


def test_training_reaches_both_branches_from_the_fresh_conversion():
    hybrid = build_hybrid(tiny_llama(), TYPES, lightning_window=8, lightning_sinks=2).train()
    ids = torch.randint(3, 97, (2, 30))
    hybrid(ids, labels=ids, use_cache=False).loss.backward()
    attn = hybrid.model.layers[0].self_attn
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_norm.weight):
        assert p.grad is not None and p.grad.abs().max() > 0


def test_window_options_are_validated():
    for bad in (dict(lightning_window=-1), dict(lightning_window=4, lightning_sinks=5),
                dict(lightning_window=True)):
        with pytest.raises(ValueError, match="lightning_"):
            HybridConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, **bad)


def test_the_exported_folder_runs_the_window_without_hybridize(tmp_path):
    hybrid = _trained_looking(build_hybrid(tiny_llama(), TYPES, lightning_window=8, lightning_sinks=2, **TINY_SPARSE))
    folder = tmp_path / "hybrid"
    save_hybrid(hybrid, folder)
    assert json.loads((folder / "config.json").read_text())["lightning_window"] == 8
    prompt = torch.randint(3, 97, (1, 20))
    expected = hybrid.generate(prompt, max_new_tokens=15, do_sample=False)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["hybridize"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = model.generate(torch.tensor({prompt.tolist()}), max_new_tokens=15, do_sample=False)
        print("TOKENS", out.tolist())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [x for x in result.stdout.splitlines() if x.startswith("TOKENS")][0] == f"TOKENS {expected.tolist()}"
    assert (folder / "window_reference.py").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_windowed_model_decodes_as_its_full_forward_through_the_kernels():
    """The Lightning Triton kernels with the window branch beside them: chunked prefill of left-padded prompts
    longer than the window, then decode steps, against the full forward, in bfloat16."""
    from helpers import GPU_SPARSE, gpu_llama

    model = _trained_looking(build_hybrid(gpu_llama(), TYPES, lightning_window=64, lightning_sinks=4,
                                          **GPU_SPARSE)).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    ids, mask = left_padded([torch.randint(3, 97, (n,), generator=g).tolist() for n in (230, 411)])
    steps = torch.randint(3, 97, (2, 20), generator=g)
    full_ids, full_mask = torch.cat([ids, steps], 1).cuda(), torch.cat([mask, torch.ones_like(steps)], 1).cuda()
    T = ids.shape[1]
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask, use_cache=False).logits.float()
        out = model(full_ids[:, :T], attention_mask=full_mask[:, :T], use_cache=True)  # chunks of 192
        cache, logits = cache_of(out), [out.logits.float()]
        for i in range(steps.shape[1]):
            logits.append(model(full_ids[:, T + i: T + i + 1], attention_mask=full_mask[:, : T + i + 1], cache=cache,
                                use_cache=True).logits.float())
    real = full_mask.bool()
    inc = torch.cat(logits, 1)
    assert ((inc[real] - full[real]).norm() / full[real].norm()).item() <= 6e-2
    assert model.decode_graphs.refusals  # decode steps ran eagerly, with the reason counted


def test_a_recipe_with_a_window_trains_both_branches_and_exports_them(tmp_path, one_thread):
    """model.lightning_window through the whole recipe: the align stage (per-layer loss, packed documents) and the
    distillation stage train the recurrent branch away from zero, and the exported folder runs the window."""
    import test_train_support as S
    from transformers import AutoModelForCausalLM

    from hybridize.train.recipe import recipe_from_dict
    from hybridize.train.trainer import train

    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs)
    recipe = S.tiny_recipe(src, docs, tmp_path / "run", tmp_path / "cache")
    recipe["model"].update(lightning_window=8, lightning_sinks=2, calibrate=False)
    result = train(recipe_from_dict(recipe))
    model = AutoModelForCausalLM.from_pretrained(result.model_dir, trust_remote_code=True)
    assert model.config.lightning_window == 8 and model.config.lightning_sinks == 2
    lightning = [i for i, t in enumerate(model.config.layer_types) if t == "linear_attention"]
    assert lightning and all(model.model.layers[i].self_attn.o_norm.weight.abs().max() > 0 for i in lightning)
    ids = torch.randint(3, 300, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, result.model(ids, use_cache=False).logits)
