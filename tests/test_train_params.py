"""Trainable presets freeze exactly what they say: requires_grad per parameter, and frozen weights bit-identical
after optimizer steps (run through the real training loop)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import test_train_support as S
from hybridize.train.models import load_models
from hybridize.train.recipe import RecipeError, recipe_from_dict
from hybridize.train.trainer import train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return S.tiny_assets(tmp_path_factory, "train_params")


def _run(assets, name, trainable, lora=None, **stage_fields):
    """Two optimizer steps with the given preset; returns (initial student state, trained state, requires_grad map)."""
    root, docs, src = assets
    stage = {"name": "s", "seq_len": 32, "global_batch_tokens": 64, "micro_batch_size": 2, "steps": 2, "lr": 1e-2,
             "trainable": trainable, "loss": {"kl": 1.0, "ce": 1.0}, "grad_clip": None, **stage_fields}
    if lora:
        stage["lora"] = lora
    recipe = S.tiny_recipe(src, docs, root / f"out-{name}", root / "cache", stages=[stage])
    recipe["output"]["export"] = False
    recipe = recipe_from_dict(recipe)
    student, _, _, _ = load_models(recipe, need_teacher=False)  # the same deterministic conversion the run starts from
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = train(recipe)
    final = {n: p.detach() for n, p in result.model.named_parameters()}
    return initial, final, set(result.trainable["s"]), result


def _layers(config, kind):
    return [i for i, t in enumerate(config.layer_types) if t == kind]


@pytest.mark.parametrize("preset", ["new", "lightning", "sparse", "all", "patterns"])
def test_presets_train_exactly_their_parameters(assets, preset):
    root, docs, src = assets
    source_names = set(load_file(str(src / "model.safetensors")))
    trainable = ["*.mlp.up_proj.weight", "model.norm.weight"] if preset == "patterns" else preset
    initial, final, grads, result = _run(assets, preset, trainable)
    config = result.model.config
    lightning = _layers(config, "linear_attention")
    sparse = _layers(config, "full_attention")
    assert lightning and sparse

    def expected(name):  # independent of the code under test: from names alone
        if preset == "all":
            return True
        if preset == "new":
            return name not in source_names
        if preset in ("lightning", "sparse"):
            m = re.match(r"model\.layers\.(\d+)\.self_attn\.", name)
            return bool(m) and int(m.group(1)) in (lightning if preset == "lightning" else sparse)
        return name.endswith(".mlp.up_proj.weight") or name == "model.norm.weight"

    assert grads == {n for n in initial if expected(n)}, f"{preset}: trained {sorted(grads)[:4]}..."
    changed = {n for n in initial if not torch.equal(initial[n], final[n])}
    frozen = {n for n in initial if not expected(n)}
    assert not (changed & frozen), f"frozen weights moved: {sorted(changed & frozen)[:3]}"
    assert changed, "nothing trained"
    if preset == "new":
        assert any(".z_proj." in n for n in changed) and any(".g_proj." in n for n in changed)


def test_lora_trains_adapters_only_and_merges_them_on_export(assets):
    pytest.importorskip("peft")
    initial, final, grads, result = _run(assets, "lora", "lora", lora={"r": 4, "alpha": 8,
                                                                       "target_modules": ["q_proj", "v_proj"]})
    assert grads and all("lora_" in n for n in grads), sorted(grads)[:3]
    names = set(final)
    assert names == set(initial), "the merged model has the plain parameter names"
    changed = {n for n in initial if not torch.equal(initial[n], final[n])}
    assert changed and all(re.search(r"self_attn\.(q_proj|v_proj)\.weight$", n) for n in changed), sorted(changed)


def test_lr_outside_mixers_sets_the_rate_of_everything_but_the_token_mixers(assets):
    # AdamW's first update moves every weight with a non-zero gradient by about its group's rate (m / sqrt(v) = +-1),
    # so one constant-rate step shows each parameter's rate in the size of its change
    initial, final, grads, _ = _run(assets, "lr_split", "all", steps=1, schedule="constant", lr=1e-2,
                                    lr_outside_mixers=1e-4)
    moved = {n: (final[n] - initial[n]).abs().max().item() for n in grads}
    mixers = {n: d for n, d in moved.items() if re.search(r"\.layers\.\d+\.self_attn\.", n)}
    rest = {n: d for n, d in moved.items() if n not in mixers}
    assert mixers and rest and any(".mlp." in n for n in rest) and any("embed" in n for n in rest)
    assert all(d <= 1.01e-4 for d in rest.values()), max(rest.items(), key=lambda kv: kv[1])
    assert max(mixers.values()) > 0.9e-2 and all(d <= 1.01e-2 for d in mixers.values())
    assert max(rest.values()) > 0.9e-4


def test_lr_outside_mixers_must_be_positive(assets):
    root, docs, src = assets
    stage = {"name": "s", "seq_len": 32, "global_batch_tokens": 64, "steps": 1, "lr": 1e-3, "lr_outside_mixers": 0}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.lr_outside_mixers.*positive"):
        recipe_from_dict(S.tiny_recipe(src, docs, root / "out-bad", root / "cache", stages=[stage]))


def test_lightning_kv_heads_of_the_source_train_and_export(assets):
    """`model.lightning_kv_heads: source` converts with the source's 2 K/V heads in the Lightning layers; a real
    two-step run trains them and the exported folder records the choice."""
    import json

    root, docs, src = assets
    stage = {"name": "s", "seq_len": 32, "global_batch_tokens": 64, "micro_batch_size": 2, "steps": 2, "lr": 1e-2,
             "trainable": "all", "loss": {"ce": 1.0}, "grad_clip": None}
    recipe = S.tiny_recipe(src, docs, root / "out-kv", root / "cache", stages=[stage])
    recipe["model"]["lightning_kv_heads"] = "source"
    recipe = recipe_from_dict(recipe)
    student, _, _, _ = load_models(recipe, need_teacher=False)
    lightning = _layers(student.config, "linear_attention")
    k = student.model.layers[lightning[0]].self_attn.k_proj.weight
    assert k.shape[0] == student.config.num_key_value_heads * student.config.head_dim < student.config.hidden_size
    initial = k.detach().clone()
    result = train(recipe)
    trained = result.model.model.layers[lightning[0]].self_attn.k_proj.weight
    assert trained.shape == initial.shape and not torch.equal(trained, initial)
    assert json.loads((result.model_dir / "config.json").read_text())["lightning_kv_heads"] == "source"
