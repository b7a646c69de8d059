"""`rope_yarn`: RoPE rescaled YaRN-style over the source's context in every layer of a conversion (for reading past
it: bench/results/retention.md, fifteenth session). The hybrid computes what transformers' own Llama computes with
those RoPE settings; convert and its CLI write them into the exported config; bad factors and already-scaled sources
are refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from helpers import tiny_llama
from hybridize.cli import main
from hybridize.convert.build import build_hybrid

DENSE = dict(hype=False, output_gates=False, sparse_dense_len=2**62)


def test_an_all_attention_hybrid_with_yarn_is_the_source_under_yarn():
    src = tiny_llama(layers=3)
    ids = torch.randint(3, 97, (2, 150), generator=torch.Generator().manual_seed(0))
    hybrid = build_hybrid(src, ["full_attention"] * 3, rope_yarn=4, **DENSE).eval()
    assert hybrid.config.rope_parameters["rope_type"] == "yarn"
    assert hybrid.config.rope_parameters["original_max_position_embeddings"] == 1024
    assert hybrid.config.max_position_embeddings == 4096
    config = src.config.__class__.from_dict({**src.config.to_dict(), "max_position_embeddings": 4096,
                                             "rope_parameters": dict(hybrid.config.rope_parameters)})
    yarn_src = LlamaForCausalLM(config).eval()
    yarn_src.load_state_dict(src.state_dict())
    with torch.no_grad():
        want = yarn_src(ids).logits
        got = hybrid(ids).logits
        plain = build_hybrid(src, ["full_attention"] * 3, **DENSE).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (plain - want).abs().max() > 1e-2  # the rescaling changes the function


def _source_folder(tmp_path, **rope):
    src = tiny_llama(layers=4)
    if rope:
        src.config.rope_parameters = rope
    src.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_convert_writes_yarn_into_the_exported_config(tmp_path):
    src = _source_folder(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(src), "--layers", "0,3", "--rope-yarn", "4", "--no-calibrate",
                                    "--no-sample", "-q", "-o", str(out)])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 4
    assert config["max_position_embeddings"] == 4096
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.arange(3, 40)[None]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("factor, rope, words", [
    ("0.5", {}, "a factor above 1"),
    ("4", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 256}, "already 'llama3'"),
])
def test_bad_factors_and_scaled_sources_are_refused_in_one_line(tmp_path, factor, rope, words):
    src = _source_folder(tmp_path, **rope)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(src), "--layers", "0,3", "--rope-yarn", factor, "--no-calibrate",
                                    "--no-sample", "-q", "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.output
    assert not out.exists()


def test_a_recipe_converts_with_yarn(tmp_path):
    """model.rope_yarn reaches the student a recipe converts (its calibration runs on that student too)."""
    import test_train_support as S

    from hybridize.train.models import load_models
    from hybridize.train.recipe import recipe_from_dict

    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs)
    recipe = S.tiny_recipe(src, docs, tmp_path / "run", tmp_path / "cache")
    recipe["model"].update(rope_yarn=2)
    student, _, _, _ = load_models(recipe_from_dict(recipe), need_teacher=False)
    params = student.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 2.0
    assert student.config.max_position_embeddings == 2 * params["original_max_position_embeddings"]
