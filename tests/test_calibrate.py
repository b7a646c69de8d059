"""Output-norm calibration of fresh Lightning layers (select.alignment.fit_output_norm): a least-squares fit against
the source's attention outputs, used before training (recipe model.calibrate) and by SALA's students."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import test_train_support as S
from helpers import tiny_llama
from hybridize.arch.configuration_hybridize import LIGHTNING
from hybridize.convert.build import build_hybrid
from hybridize.select.alignment import calibrate_lightning_outputs, fit_output_norm
from hybridize.select.placement import layer_types_for
from hybridize.select.runner import LayerRunner, reference_hybrid


def _relative_error(attention, x, ctx, target) -> float:
    with torch.no_grad():
        out = attention(x, ctx)
    return float((out - target).pow(2).mean() / target.pow(2).mean())


@pytest.fixture(scope="module")
def fresh():
    src = tiny_llama(layers=4, seed=3)
    hybrid = build_hybrid(src, layer_types_for(4, "1:3"), hype=True, output_gates=True)
    for p in hybrid.parameters():
        p.data = p.data.clone()
    runner = LayerRunner(reference_hybrid(src))
    ids = torch.randint(3, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    ctx = runner.context(ids)
    layer = hybrid.config.layer_types.index(LIGHTNING)
    x, target = runner.attention_io(ids)[layer]
    return src, hybrid, layer, x, ctx, target


def test_fits_are_least_squares_and_per_channel_is_at_least_as_good(fresh, seed):
    _, hybrid, layer, x, ctx, target = fresh
    before = _relative_error(hybrid.model.layers[layer].self_attn, x, ctx, target)
    errors = {}
    for per_channel in (False, True):
        attention = copy.deepcopy(hybrid.model.layers[layer].self_attn)
        got = fit_output_norm(attention, x, ctx, target, per_channel=per_channel)
        # the returned error is what the layer now computes, and it is no worse than outputting nothing
        assert got == pytest.approx(_relative_error(attention, x, ctx, target), rel=1e-3, abs=1e-6)
        assert got <= min(before, 1.0) + 1e-6
        # a least-squares optimum: nudging the fitted weight in any direction makes it worse
        fitted = attention.o_norm.weight.detach().clone()
        for _ in range(3):
            step = torch.randn_like(fitted) * (fitted.abs().mean() * 0.05 + 1e-4)
            attention.o_norm.weight.data = fitted + (step if per_channel else fitted * 0.05 * step.sign()[0])
            assert _relative_error(attention, x, ctx, target) > got - 1e-7
        errors[per_channel] = got
    assert errors[True] <= errors[False] + 1e-6
    assert before > 1.0  # the fresh layer's unit-RMS output is far off the source's: what calibration is for


def test_calibration_fits_every_lightning_layer_and_no_sparse_one(fresh):
    src, hybrid, *_ = fresh
    hybrid = copy.deepcopy(hybrid)
    sparse_before = {n: p.clone() for n, p in hybrid.named_parameters() if "o_norm" not in n}
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    errors = calibrate_lightning_outputs(hybrid, src, ids)
    assert sorted(errors) == [i for i, t in enumerate(hybrid.config.layer_types) if t == LIGHTNING]
    assert all(0.0 <= e <= 1.0 + 1e-6 for e in errors.values())
    assert all(torch.equal(p, sparse_before[n]) for n, p in hybrid.named_parameters() if "o_norm" not in n)


def test_recipe_students_start_calibrated_unless_switched_off(tmp_path):
    from hybridize.train.models import load_models
    from hybridize.train.recipe import recipe_from_dict

    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs)
    students = {}
    for on in (True, False):
        recipe = S.tiny_recipe(src, docs, tmp_path / f"run{on}", tmp_path / "cache", )
        recipe["model"]["calibrate"] = on
        student, teacher, tok, desc = load_models(recipe_from_dict(recipe), need_teacher=True)
        assert ("output norms fitted" in desc) == on, desc
        students[on] = student
    # on text the fit did not see, the calibrated Lightning layers are closer to the source's attention outputs
    runner = LayerRunner(reference_hybrid(teacher.float()))
    ids = tok(" ".join(p.read_text() for p in sorted(docs.glob("*.txt"))), return_tensors="pt").input_ids[:, -256:]
    ctx = runner.context(ids)
    io = runner.attention_io(ids)
    for i, kind in enumerate(students[True].config.layer_types):
        if kind == LIGHTNING:
            on, off = (_relative_error(students[c].model.layers[i].self_attn, *io[i][:1], ctx, io[i][1])
                       for c in (True, False))
            assert on < off


def test_convert_fits_the_output_norms_of_the_folder_it_writes(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridize.arch import register_auto_classes
    from hybridize.convert.converter import convert

    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs)
    on = convert(str(src), tmp_path / "on", ratio="1:1", progress=False)  # default: a small source with a tokenizer
    off = convert(str(src), tmp_path / "off", ratio="1:1", progress=False, calibrate=False)
    config = json.loads((tmp_path / "on" / "config.json").read_text())
    lightning = [i for i, t in enumerate(config["layer_types"]) if t == LIGHTNING]
    assert off.calibration is None and sorted(int(i) for i in on.calibration["relative_error"]) == lightning
    assert config["conversion"]["calibrated_output_norms"]["tokens"] == on.calibration["tokens"]
    weights = {k: v for f in (tmp_path / "on").glob("*.safetensors") for k, v in load_file(f).items()}
    plain = {k: v for f in (tmp_path / "off").glob("*.safetensors") for k, v in load_file(f).items()}
    for name in plain:  # only the Lightning output norms differ, and those were ones
        if name.endswith("o_norm.weight") and int(name.split(".")[2]) in lightning:
            assert torch.equal(plain[name], torch.ones_like(plain[name]))
            assert not torch.equal(weights[name], plain[name])
        else:
            assert torch.equal(weights[name], plain[name]), name
    # loaded as a user loads it, the calibrated folder is closer to the source on text the fit did not see
    register_auto_classes()
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(" ".join(p.read_text() for p in sorted(docs.glob("*.txt"))), return_tensors="pt").input_ids[:, -200:]
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        ref = source(ids).logits.log_softmax(-1)
        kl = {}
        for name in ("on", "off"):
            model = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
            kl[name] = float((ref.exp() * (ref - model(ids).logits.log_softmax(-1))).sum(-1).mean())
    assert kl["on"] < kl["off"]


def test_convert_calibration_without_a_tokenizer_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from hybridize.cli import main

    src = tiny_llama(layers=4)
    src.save_pretrained(tmp_path / "bare")  # no tokenizer files
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "bare"), "-o", str(tmp_path / "out"), "--calibrate",
                                       "--no-sample", "-q"])
    assert result.exit_code == 2 and "tokenizer" in result.output and "--no-calibrate" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "bare"), "-o", str(tmp_path / "out"), "--no-sample",
                                       "-q"])  # the default skips calibration where it cannot make it
    assert result.exit_code == 0, result.output
    assert "fitted" not in result.output
