"""Decode steps cut into the pieces that CUDA graphs replay (hybridize/arch/decode_graphs.py), run eagerly on the CPU:
the same logits and cache as the plain forward, step after step, and the plain forward wherever a step is unusual."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import TINY_SPARSE, cache_of, left_padded_prompts, tiny_llama
from hybridize.arch import HybridCache, HybridConfig
from hybridize.arch.configuration_hybridize import LIGHTNING, SPARSE
from hybridize.arch.decode_graphs import DecodePiece, plan_pieces
from hybridize.convert.build import build_hybrid
from hybridize.export import architecture_files, save_hybrid

STEPS = 45  # past several compressed-key windows (stride 4) and coarse windows (stride 16) of TINY_SPARSE


def _hybrid(types=("lightning", "sparse", "lightning", "sparse"), **options):
    model = build_hybrid(tiny_llama(layers=len(types)), list(types), **{**TINY_SPARSE, **options})
    model.decode_graphs.allow_cpu = True  # the segmented step on the CPU (no graphs to record there)
    return model




def _prefill(model, ids, mask):
    out = model(ids, attention_mask=mask, use_cache=True)
    return out.logits[:, -1:], cache_of(out)


def _eager_step(model, token, cache):
    """One step through the plain forward (the graphs' path refused: a CPU tensor without allow_cpu)."""
    graphs = model.decode_graphs
    graphs.allow_cpu, paths = False, sum(graphs.paths.values())
    out = model(token, cache=cache, use_cache=True)
    graphs.allow_cpu = True
    assert sum(graphs.paths.values()) == paths
    return out.logits


def _segmented_step(model, token, cache):
    graphs = model.decode_graphs
    before = graphs.paths["segmented"]
    out = model(token, cache=cache, use_cache=True)
    assert graphs.paths["segmented"] == before + 1, graphs.refusals
    return out.logits


def _assert_same_cache(a, b):
    assert a.seq_len == b.seq_len
    for i, kind in enumerate(a.layer_types):
        if kind == LIGHTNING:
            assert torch.equal(a.states[i], b.states[i]), i
        else:
            assert torch.equal(a.keys[i], b.keys[i]) and torch.equal(a.values[i], b.values[i]), i
            assert torch.equal(a.ckeys[i], b.ckeys[i]), i


# ---------------------------------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------------------------------
def test_pieces_are_cut_at_every_sparse_layer():
    L, S = LIGHTNING, SPARSE
    assert plan_pieces([L, S, L, S]) == [DecodePiece(0, None, (0,), 1), DecodePiece(1, 1, (2,), 3),
                                         DecodePiece(2, 3, (), None)]
    assert plan_pieces([S, S, L, L]) == [DecodePiece(0, None, (), 0), DecodePiece(1, 0, (), 1),
                                         DecodePiece(2, 1, (2, 3), None)]
    assert plan_pieces([L, L]) == [DecodePiece(0, None, (0, 1), None)]


# ---------------------------------------------------------------------------------------------------------------------
# The segmented step equals the plain forward
# ---------------------------------------------------------------------------------------------------------------------
MODELS = {
    "hype-gates": dict(types=("lightning", "sparse", "lightning", "sparse")),
    # first layer sparse, two sparse in a row (a piece without Lightning layers), RoPE and HALO's query scale in the
    # sparse layers, no output gates
    "rope-logscale": dict(types=("sparse", "lightning", "sparse", "sparse", "lightning"), hype=False,
                          sparse_query_log_scale=362.0, output_gates=False),
}


@pytest.mark.parametrize("lengths", [(41,), (40, 23, 31)], ids=["batch1", "batch3-left-padded"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_segmented_greedy_decoding_equals_the_plain_forward(name, lengths):
    options = dict(MODELS[name])
    model = _hybrid(options.pop("types"), **options)
    ids, mask = left_padded_prompts(lengths, seed=len(lengths))
    with torch.no_grad():
        logits_a, eager = _prefill(model, ids, mask)
        logits_b, segmented = _prefill(model, ids, mask)
        counts_before = segmented.compressed_count(segmented.seq_len)
        for _ in range(STEPS):
            token = logits_a.argmax(-1)
            assert torch.equal(token, logits_b.argmax(-1))
            logits_a = _eager_step(model, token, eager)
            logits_b = _segmented_step(model, token, segmented)
            assert torch.equal(logits_a, logits_b)
    _assert_same_cache(eager, segmented)
    # the sparse path (beyond dense_len and top-k blocks) ran, and compressed keys were appended on the way
    shortest = min(lengths) + STEPS
    assert shortest > TINY_SPARSE["sparse_dense_len"]
    assert shortest > TINY_SPARSE["sparse_topk"] * TINY_SPARSE["sparse_block_size"]
    counts_after = segmented.compressed_count(segmented.seq_len)
    assert all(after >= before + STEPS // 4 for before, after in zip(counts_before, counts_after))
    # the segmented cache's Lightning states are the runner's buffers, updated in place
    runner = next(iter(model.decode_graphs.runners.values()))
    assert all(segmented.states[i] is buf for i, buf in runner.states.items())
    assert model.decode_graphs.paths["segmented"] == STEPS


def test_reorder_select_and_a_second_cache_keep_the_segmented_step_exact():
    """`reorder_cache` and `batch_select_indices` replace the cache's states (they are copied into the runner's
    buffers again, or go to another batch size's runner); a second cache decoding through the same runner hands the
    first its own copies, so the first continues exactly when it comes back."""
    model = _hybrid()
    ids, mask = left_padded_prompts((33, 20, 27), seed=7)
    with torch.no_grad():
        tok_a, eager = _prefill(model, ids, mask)
        tok_b, segmented = _prefill(model, ids, mask)

        def steps(n):
            nonlocal tok_a, tok_b
            for _ in range(n):
                la = _eager_step(model, tok_a.argmax(-1), eager)
                lb = _segmented_step(model, tok_b.argmax(-1), segmented)
                assert torch.equal(la, lb)
                tok_a, tok_b = la, lb

        steps(6)
        perm = torch.tensor([2, 0, 1])
        for cache in (eager, segmented):
            cache.reorder_cache(perm)
        tok_a, tok_b = tok_a[perm], tok_b[perm]
        steps(6)
        # another generation through the same batch size's runner, then back to the first
        other_ids, other_mask = left_padded_prompts((12, 30, 18), seed=8)
        other_logits, other = _prefill(model, other_ids, other_mask)
        other_eager_logits, other_eager = _prefill(model, other_ids, other_mask)
        for _ in range(5):
            a = _eager_step(model, other_eager_logits.argmax(-1), other_eager)
            b = _segmented_step(model, other_logits.argmax(-1), other)
            assert torch.equal(a, b)
            other_eager_logits, other_logits = a, b
        steps(6)
        keep = torch.tensor([0, 2])
        for cache in (eager, segmented):
            cache.batch_select_indices(keep)
        tok_a, tok_b = tok_a[keep], tok_b[keep]
        steps(8)
    _assert_same_cache(eager, segmented)
    _assert_same_cache(other_eager, other)
    assert sorted(key[0] for key in model.decode_graphs.runners) == [2, 3]


def test_runner_buffers_serve_inference_mode_and_no_grad_alike():
    """The runner's buffers are ordinary tensors even when made under inference mode: a later generation under no_grad
    writes them in place through the same runner."""
    model = _hybrid()
    ids, mask = left_padded_prompts((26, 30), seed=9)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            la, eager = _prefill(model, ids, mask)
            lb, segmented = _prefill(model, ids, mask)
            for _ in range(4):
                la, lb = _eager_step(model, la.argmax(-1), eager), _segmented_step(model, lb.argmax(-1), segmented)
                assert torch.equal(la, lb)
        _assert_same_cache(eager, segmented)
    assert len(model.decode_graphs.runners) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Unusual steps take the plain forward
# ---------------------------------------------------------------------------------------------------------------------
def _plain_forward_ran(model, call) -> bool:
    """Whether `call` ran its decode step through the plain forward: no piecewise step, one more refusal."""
    graphs = model.decode_graphs
    paths, refusals = sum(graphs.paths.values()), sum(graphs.refusals.values())
    call()
    return sum(graphs.paths.values()) == paths and sum(graphs.refusals.values()) == refusals + 1


def test_unusual_steps_take_the_plain_forward():
    model = _hybrid()
    ids, mask = left_padded_prompts((30, 22), seed=3)
    token = torch.randint(3, 97, (2, 1))
    with torch.no_grad():
        _, cache = _prefill(model, ids, mask)
        _segmented_step(model, token, cache)  # the usual step takes the pieces
        start = cache.seq_len
        embeds = model.get_input_embeddings()(token)

        def check(call):
            assert _plain_forward_ran(model, call)

        check(lambda: model(token, cache=cache, output_hidden_states=True))
        check(lambda: model(inputs_embeds=embeds, cache=cache))
        check(lambda: model(torch.cat([token, token], 1), cache=cache))
        check(lambda: model(token, cache=cache, labels=token))
        check(lambda: model(token, cache=cache, position_ids=torch.full((2, 1), 40)))
        check(lambda: model(token, use_cache=False))
        check(lambda: model(token, cache=HybridCache(model.config)))  # nothing cached yet
        model.config.decode_cuda_graphs = False
        check(lambda: model(token, cache=cache))
        model.config.decode_cuda_graphs = True
        model.decode_graphs.allow_cpu = False
        check(lambda: model(token, cache=cache))  # a CPU step: no graphs there
        model.decode_graphs.allow_cpu = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            check(lambda: model(token, cache=cache))
        seen = []
        handle = model.model.layers[2].mlp.register_forward_hook(lambda *a: seen.append(1))
        check(lambda: model(token, cache=cache))
        assert seen == [1]  # the hook ran: the plain forward did
        handle.remove()
        model.train()
        check(lambda: model(token, cache=cache))
        model.eval()
        grad_twin = copy.deepcopy(cache)
    check(lambda: model(token, cache=grad_twin))  # autograd on
    assert cache.seq_len == start + 11  # every step above advanced the cache
    # and the usual step takes the pieces again, on the cache the plain forward advanced, with the plain logits
    with torch.no_grad():
        twin = copy.deepcopy(cache)
        assert torch.equal(_segmented_step(model, token, cache), _eager_step(model, token, twin))


def test_peft_adapters_take_the_plain_forward():
    peft = pytest.importorskip("peft")
    model = _hybrid()
    ids, mask = left_padded_prompts((30,), seed=4)
    token = torch.randint(3, 97, (1, 1))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.eval()
    with torch.no_grad():
        out = lora(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = cache_of(out)
        assert _plain_forward_ran(model, lambda: lora(input_ids=token, cache=cache, use_cache=True))


# ---------------------------------------------------------------------------------------------------------------------
# generate, copies, config, export
# ---------------------------------------------------------------------------------------------------------------------
def test_generate_through_the_pieces_gives_the_plain_tokens():
    model = _hybrid()
    model.generation_config.pad_token_id = 0
    ids, mask = left_padded_prompts((14, 25, 9), seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=False)
    pieces = model.generate(ids, **kw)
    assert model.decode_graphs.paths["segmented"] >= STEPS - 1
    model.config.decode_cuda_graphs = False
    plain = model.generate(ids, **kw)
    assert torch.equal(pieces, plain)


def test_a_copied_or_pickled_model_starts_without_runners(tmp_path):
    model = _hybrid()
    ids, mask = left_padded_prompts((30,), seed=6)
    with torch.no_grad():
        logits, cache = _prefill(model, ids, mask)
        _segmented_step(model, logits.argmax(-1), cache)
    twin = copy.deepcopy(model)
    assert twin.decode_graphs is not model.decode_graphs and twin.decode_graphs.allow_cpu
    assert not twin.decode_graphs.runners and model.decode_graphs.runners
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert not loaded.decode_graphs.runners


def test_config_switch_validated_and_on_when_an_old_folder_lacks_it(tmp_path):
    config = HybridConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                          layer_types=["lightning", "sparse"])
    assert config.decode_cuda_graphs is True
    config.save_pretrained(tmp_path)
    path = Path(tmp_path) / "config.json"
    data = json.loads(path.read_text())
    del data["decode_cuda_graphs"]  # a folder exported before the switch existed
    path.write_text(json.dumps(data))
    assert HybridConfig.from_pretrained(tmp_path).decode_cuda_graphs is True
    with pytest.raises(ValueError, match="decode_cuda_graphs"):
        HybridConfig(num_hidden_layers=1, layer_types=["sparse"], decode_cuda_graphs="yes")


def test_an_exported_folder_decodes_through_its_own_pieces(tmp_path):
    """The folder's own copy of the modeling files (trust_remote_code, in a process where hybridize cannot be
    imported) takes the piecewise step and gives the tokens of the installed classes."""
    model = _hybrid()
    save_hybrid(model, tmp_path / "out")
    ids, mask = left_padded_prompts((20, 13), seed=10)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kw)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["hybridize"] = None  # any import of hybridize fails in this process
        import torch
        from transformers import AutoModelForCausalLM
        loaded = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True).eval()
        assert "hybridize" not in type(loaded).__module__.split(".")[0]
        loaded.decode_graphs.allow_cpu = True
        got = loaded.generate(torch.tensor({ids.tolist()}), attention_mask=torch.tensor({mask.tolist()}),
                              max_new_tokens=12, do_sample=False, pad_token_id=0)
        print("SEGMENTED", loaded.decode_graphs.paths["segmented"])
        print("TOKENS", got.tolist())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("SEGMENTED", "TOKENS")))
    assert int(lines["SEGMENTED"]) >= 1
    assert lines["TOKENS"] == str(expected.tolist())


def test_export_carries_every_architecture_file():
    arch = Path(__file__).resolve().parents[1] / "hybridize" / "arch"
    carried = {p.name for p in architecture_files()}
    assert {p.name for p in arch.glob("*.py") if p.name != "__init__.py"} <= carried
    assert "decode_graphs.py" in carried
