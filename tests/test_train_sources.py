"""`hybridize train` reads every source format `hybridize convert` reads (one loader: convert.source.open_source):
here a bare .safetensors state dict with its config.json beside it, and a GGUF file."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import test_train_support as S
from hybridize.cli import main
from hybridize.train.models import load_models
from hybridize.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

_STAGE = {"name": "ce", "seq_len": 32, "global_batch_tokens": 64, "micro_batch_size": 2, "steps": 1, "lr": 1e-3,
          "schedule": "constant", "trainable": "all", "loss": {"ce": 1.0}}


def test_train_runs_from_a_safetensors_file(tmp_path):
    docs = S.write_documents(tmp_path / "docs", count=3)
    src = S.make_tiny_source(tmp_path / "src", docs, layers=2)
    recipe = S.tiny_recipe(src / "model.safetensors", docs, tmp_path / "out", tmp_path / "cache", stages=[_STAGE])
    recipe["data"]["heldout_fraction"] = 0.0
    result = CliRunner().invoke(main, ["train", str(S.write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_train_builds_its_student_from_a_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    from hybridize.convert.default_model import default_gguf_path

    try:
        gguf = default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    docs = S.write_documents(tmp_path / "docs", count=2)
    recipe = S.tiny_recipe(gguf, docs, tmp_path / "out", tmp_path / "cache", stages=[_STAGE])
    recipe["model"]["ratio"] = "1:3"
    student, teacher, tok, description = load_models(load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)),
                                                     need_teacher=False)
    assert teacher is None and tok is not None and str(gguf) in description
    types = student.config.layer_types
    assert len(types) == 30 and types.count("full_attention") == 8
