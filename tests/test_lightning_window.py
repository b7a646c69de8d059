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


def _windowed_source(src, layers: set[int], window: int, sinks: int, name: str, reach: int = 0):
    """The source with its attention in `layers` cut to the first `sinks` and the last `window` keys (its own mask,
    written out here rather than taken from the code under test); `reach`: a sink further back than that is scored
    with its key turned on by the source's own RoPE as if it lay `reach` back."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        t = query.shape[2]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        allowed = j <= i
        if module.layer_idx in layers:
            allowed = allowed & ((i - j < window) | (j < sinks))
        scores = (query @ key.transpose(-1, -2)) * scaling
        if module.layer_idx in layers and reach:
            for s in range(sinks):
                far = (i[:, 0] - s > reach).nonzero()[:, 0]
                if len(far):  # the key at s rotated on by (i - s - reach) for each far query i
                    cos, sin = src.model.rotary_emb(key, (far - s - reach)[None])
                    moved, _ = apply_rotary_pos_emb(key[:, :, s:s + 1].expand(-1, -1, len(far), -1), key[:, :, :1],
                                                    cos, sin)
                    scores[:, :, far, s] = (query[:, :, far] * moved).sum(-1) * scaling
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


def test_a_sink_reach_reads_far_sinks_as_if_they_lay_that_far_back():
    """lightning_sink_reach: the fresh conversion is the source with its attention cut to the window and each sink
    further back than the reach scored as if it lay exactly that far back (RoPE turned on in the test by the
    source's own rotary code); within the reach nothing changes."""
    window, sinks, reach = 6, 2, 14
    hybrid = build_hybrid(tiny_llama(), TYPES, hype=False, lightning_window=window, lightning_sinks=sinks,
                          lightning_sink_reach=reach)
    plain = build_hybrid(tiny_llama(), TYPES, hype=False, lightning_window=window, lightning_sinks=sinks)
    expected_model = _windowed_source(tiny_llama(), {0, 2, 3}, window, sinks, "test_sink_reach", reach=reach)
    ids = torch.randint(3, 97, (2, 41))
    with torch.no_grad():
        expected = expected_model(ids).logits
        got = hybrid(ids, use_cache=False).logits
        unreached = plain(ids, use_cache=False).logits
    assert (expected - got).abs().max() <= 1e-4
    assert (unreached[:, reach + 1:] - got[:, reach + 1:]).abs().max() > 1e-3  # past the reach it matters
    torch.testing.assert_close(got[:, : reach + 1], unreached[:, : reach + 1])  # up to it, nothing changes


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


@pytest.mark.parametrize("chunk,reach", [(None, 0), (16, 0), (None, 20), (16, 20)])
def test_cached_generation_equals_the_full_forward(chunk, reach):
    """Left-padded prompts prefilled (in one pass, or in chunks longer than the window, which go through the store
    piece by piece) and decoded one token at a time give the full forward's logits, a sink reach crossed on the way
    included; the store holds each row's sinks and its last `window` positions."""
    options = dict(TINY_SPARSE, prefill_chunk_size=chunk, lightning_sink_reach=reach)
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
                dict(lightning_window=True), dict(lightning_window=8, lightning_sink_reach=15),
                dict(lightning_sink_reach=-1)):
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
@pytest.mark.parametrize("reach", [0, 300])
def test_gpu_windowed_model_decodes_as_its_full_forward_through_the_kernels(reach):
    """The Lightning Triton kernels with the window branch beside them: chunked prefill of left-padded prompts
    longer than the window, then decode steps, against the full forward, in bfloat16 (a sink reach crossed on the
    way too)."""
    from helpers import GPU_SPARSE, gpu_llama

    model = _trained_looking(build_hybrid(gpu_llama(), TYPES, lightning_window=64, lightning_sinks=4,
                                          lightning_sink_reach=reach, **GPU_SPARSE)).to("cuda", torch.bfloat16)
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


@pytest.mark.parametrize("flags, reach", [([], 1024), (["--lightning-sink-reach", "0"], 0),
                                          (["--lightning-sink-reach", "40"], 40)])
def test_convert_holds_the_sinks_at_the_source_context_unless_told(tmp_path, flags, reach):
    """A windowed conversion reads its sinks from at most the source's context (tiny_llama's 1024) by default; the
    flag sets another reach or 0 (off); a reach under twice the window is refused in one line, nothing written."""
    from click.testing import CliRunner

    from hybridize.cli import main

    tiny_llama().save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    args = ["convert", str(tmp_path / "src"), "--layers", "1", "--lightning-window", "16", "--no-calibrate",
            "--no-sample", "-q", "-o", str(out)]
    res = CliRunner().invoke(main, args + flags)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["lightning_sink_reach"] == reach
    bad = CliRunner().invoke(main, args + ["--lightning-sink-reach", "31", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output
    assert "at least twice" in bad.output and not (tmp_path / "bad").exists()


def test_a_recipe_converts_with_the_sinks_reach(tmp_path):
    """model.lightning_sink_reach reaches the student a recipe converts; unset, it is the source's context."""
    import test_train_support as S

    from hybridize.train.models import load_models
    from hybridize.train.recipe import recipe_from_dict

    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs)
    recipe = S.tiny_recipe(src, docs, tmp_path / "run", tmp_path / "cache")
    context = json.loads((src / "config.json").read_text())["max_position_embeddings"]
    for reach, want in ((None, max(context, 16)), (24, 24)):
        recipe["model"].update(lightning_window=8, lightning_sink_reach=reach)
        student = load_models(recipe_from_dict(recipe), need_teacher=False)[0]
        assert student.config.lightning_sink_reach == want

