"""The training-throughput benchmark's batches: packed documents reach the hybrid as the trainer hands them over."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from helpers import tiny_llama
from hybridize.arch.configuration_hybridize import default_layer_types
from hybridize.convert.build import build_hybrid

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _train_quality(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # as when run as a script: its folder's modules import by name
    spec = importlib.util.spec_from_file_location("bench_train_quality", BENCH / "train_quality.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_packed_documents_are_read_one_by_one_and_the_dense_model_reads_rows(monkeypatch):
    tq = _train_quality(monkeypatch)
    dense = tiny_llama()
    hybrid = build_hybrid(dense, default_layer_types(4)).eval()
    torch.manual_seed(0)
    ids, packed = tq.training_batch(hybrid, seq_len=40, tokens_per_step=80, document_tokens=16, device="cpu")
    assert ids.shape == (1, 80)
    # documents of 16 tokens, each row of 40 starting one too: 0 16 32 | 40 56 72 | 80
    assert packed["cu_seqlens"].tolist() == [0, 16, 32, 40, 56, 72, 80]
    assert packed["position_ids"][0, 30:44].tolist() == [14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    with torch.no_grad():
        together = hybrid(input_ids=ids, use_cache=False, **packed).logits
        alone = hybrid(input_ids=ids[:, 56:72], use_cache=False).logits
    torch.testing.assert_close(together[:, 56:72], alone, rtol=1e-4, atol=1e-4)
    rows, none = tq.training_batch(dense, seq_len=40, tokens_per_step=80, document_tokens=16, device="cpu")
    assert rows.shape == (2, 40) and none == {}


def test_step_calibration_fills_the_budget_with_micro_batches_that_divide_each_stage(monkeypatch, tmp_path):
    """The retention benchmark's calibration on a real tiny recipe: a step count per stage from the measured micro-batch
    time, the fastest micro-batch that divides the stage's batch written into it; a `cuda_graphs` stage on the CPU is
    timed eagerly (graphs need CUDA); a KL cut at a position (`kl_max_position`) is timed as the trainer weighs it
    (2026-12-03: its batches lacked the count, so calibration failed on the H200 after 7 minutes of preparation)."""
    import test_train_support as S
    from transformers import LlamaForCausalLM

    from hybridize.train.recipe import recipe_from_dict

    tq = _train_quality(monkeypatch)
    docs = S.write_documents(tmp_path / "docs", count=3)
    src = S.make_tiny_source(tmp_path / "src", docs)
    spec = S.tiny_recipe(src, docs, tmp_path / "out", tmp_path / "cache")
    spec["stages"][1].update(join_documents=True, cuda_graphs=True, gradient_checkpointing=False)
    spec["stages"][1]["loss"]["kl_max_position"] = 8
    recipe = recipe_from_dict(spec)
    teacher = LlamaForCausalLM.from_pretrained(src).eval()
    student = build_hybrid(teacher, default_layer_types(4))
    short = tq.calibrate(recipe, student, teacher, 1e-4, [0.5, 0.5], device="cpu", micro_factors=(1, 2, 4))
    long = tq.calibrate(recipe, student, teacher, 5000.0, [0.5, 0.5], device="cpu", micro_factors=(1, 2, 4))
    assert short == [1, 1]  # at least one step, however short the budget
    assert all(n > 10 for n in long)
    for stage in recipe.stages:
        batch = stage.global_batch_tokens // stage.seq_len
        assert batch % stage.micro_batch_size == 0 and stage.micro_batch_size <= batch


def test_stage_end_measurement_records_probes_and_passkey_after_each_stage_only(monkeypatch, tmp_path):
    """The quality benchmark's per-stage check: nothing until a stage's last step, then held-out perplexity, the factual
    probes (how many right, how many repeat the prompt) and pass-key exact match and likelihood choice by length, for
    the student."""
    import test_train_support as S

    tq = _train_quality(monkeypatch)
    _, tok, source = S.tiny_teacher(tmp_path, layers=2)
    hybrid = build_hybrid(source, ["lightning", "sparse"]).eval()
    check = tq.StageEndHeldout(hybrid, tok, {"align": 3}, bf16=False, probes=True,
                               passkey_lengths=(256, 512))  # the tiny model's context
    check(2, {"stage": "align", "step": 2})
    assert check.results == {}
    check(3, {"stage": "align", "step": 3})
    got = check.results["align"]
    assert {"wiki", "news", "pydoc"} <= set(got) and all(v["512"] > 1 for k, v in got.items() if k in ("wiki", "news"))
    assert 0 <= got["probes_echoed"] <= 100 and 0 <= got["probes_correct"] <= 100
    assert set(got["passkey_exact"]) == {"256", "512"}
    assert all(len(row) == 2 and all(0.0 <= x <= 1.0 for x in row) for row in got["passkey_exact"].values())
    assert set(got["passkey_choice"]) == {"256", "512"}
    assert all(len(row) == 2 and all(0.0 <= x <= 1.0 for x in row) for row in got["passkey_choice"].values())
    # the untrained hybrid misses at most its 4 probes per length, and no more at the first token than it misses (exact < 1)
    for n, first in got["passkey_first_token_misses"].items():
        assert 0 <= first <= 4 - round(4 * sum(got["passkey_exact"][n]) / 2)
    assert check.seconds > 0


def test_stage_steps_leave_stages_out_so_a_run_can_continue_from_another_runs_export(monkeypatch, tmp_path):
    """--steps with zeros: one run stops after its first stage and exports; another starts from that folder
    (model.converted) and trains only the second stage, from the first run's weights (what the second stage leaves
    frozen is the first run's, not a fresh conversion's). Bad counts exit with a message."""
    import pytest
    import test_train_support as S
    from safetensors.torch import load_file

    from hybridize.train.models import load_models
    from hybridize.train.recipe import recipe_from_dict
    from hybridize.train.trainer import train

    tq = _train_quality(monkeypatch)
    docs = S.write_documents(tmp_path / "docs", count=3)
    src = S.make_tiny_source(tmp_path / "src", docs)
    first = recipe_from_dict(S.tiny_recipe(src, docs, tmp_path / "a", tmp_path / "cache"))
    fresh = {k: v.detach().clone() for k, v in load_models(first, need_teacher=False)[0].state_dict().items()}
    tq.set_stage_steps(first, "3,0")
    assert [(s.name, s.steps, s.tokens) for s in first.stages] == [("align", 3, None)]
    done = train(first)
    assert [h["stage"] for h in done.history] == ["align"] * 3

    spec = S.tiny_recipe(src, docs, tmp_path / "b", tmp_path / "cache")
    spec["model"] = {"source": str(src), "converted": str(done.model_dir)}
    spec["stages"][1]["trainable"] = "sparse"
    second = recipe_from_dict(spec)
    tq.set_stage_steps(second, "0,2")
    then = train(second)
    assert [h["stage"] for h in then.history] == ["distil"] * 2

    def weights(folder):
        return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    exported, final = weights(done.model_dir), weights(then.model_dir)
    aligned = [k for k in exported if k in fresh and not torch.equal(exported[k], fresh[k].to(exported[k].dtype))]
    moved = [k for k in exported if not torch.equal(exported[k], final[k])]
    assert aligned and moved and not set(aligned) & set(moved)  # align's work kept, the sparse layers trained on
    for k in aligned:
        assert torch.equal(final[k], exported[k])
    for bad in ("3", "0,0", "2,-1", "a,b"):
        with pytest.raises(SystemExit, match="one count each"):
            tq.set_stage_steps(recipe_from_dict(S.tiny_recipe(src, docs, tmp_path / "c", tmp_path / "cache")), bad)
