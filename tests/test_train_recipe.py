"""Recipe validation (one-line errors naming file and field), --set overrides, schedules, data sources."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import test_train_support as S
from hybridize.cli import main
from hybridize.train.data import MixtureStream, build_corpus, pack
from hybridize.train.plan import plan_stage
from hybridize.train.recipe import RecipeError, load_recipe
from hybridize.train.schedule import lr_at


def _good(tmp_path):
    return S.tiny_recipe(tmp_path / "src", tmp_path / "docs", tmp_path / "out", tmp_path / "cache")


@pytest.mark.parametrize("mutate, field, words", [
    (lambda r: r["stages"][0].update(schedule="cos"), "stages[0].schedule", "constant, cosine, linear, wsd"),
    (lambda r: r["stages"][1].update(lr="fast"), "stages[1].lr", "must be a number"),
    (lambda r: r["stages"][0].update(learning_rate=1e-3), "stages[0].learning_rate", "unknown field"),
    (lambda r: r["stages"][0].pop("seq_len"), "stages[0].seq_len", "is required"),
    (lambda r: r["stages"][0].update(global_batch_tokens=100), "stages[0].global_batch_tokens", "multiple of seq_len"),
    (lambda r: r["stages"][0].update(steps=None), "stages[0].tokens", "exactly one of tokens or steps"),
    (lambda r: r["stages"][1]["loss"].update(kl_direction="sideways"), "stages[1].loss.kl_direction", "forward, reverse"),
    (lambda r: r["stages"][0].update(trainable="some"), "stages[0].trainable", "new, lightning, sparse, all, lora"),
    (lambda r: r["data"]["sources"][0].update(type="csv"), "data.sources[0].type", "text, jsonl"),
    (lambda r: r.update(precision="fp8"), "precision", "fp32, bf16"),
    (lambda r: r["model"].update(lightning_kv_heads="group"), "model.lightning_kv_heads", "query, source"),
    (lambda r: r["model"].update(rope_yarn=0.5), "model.rope_yarn", "a factor above 1"),
    (lambda r: r["model"].update(rope_yarn=4, converted="some/hybrid"), "model.rope_yarn", "--rope-yarn"),
    (lambda r: r["model"].update(lightning_window=8, lightning_sink_reach=10), "model.lightning_sink_reach",
     "at least twice"),
    (lambda r: r["model"].update(lightning_sink_reach=64, converted="some/hybrid"), "model.lightning_sink_reach",
     "--lightning-sink-reach"),
    (lambda r: r["model"].update(lightning_window=64, converted="some/hybrid"), "model.lightning_window",
     "set model.lightning_window to 0"),
    (lambda r: r["output"].update(keep_last="two"), "output.keep_last", "must be an integer"),
    (lambda r: r["stages"][0]["loss"].update(kl_max_position=16), "stages[0].loss.kl_max_position",
     "does not have: set loss.kl"),
    (lambda r: r["stages"][1]["loss"].update(kl_max_position=16, ce=0), "stages[1].loss.kl_max_position",
     "positions 16-63 of each row without a loss"),
    (lambda r: r["stages"][1]["loss"].update(kl_max_position=0), "stages[1].loss.kl_max_position", "positive"),
    (lambda r: r["stages"][1]["loss"].update(hidden_inputs="teacher_inputs"), "stages[1].loss.hidden_inputs",
     "combine it with hidden_mse only"),
    (lambda r: r["stages"][0]["loss"].update(hidden_at="block"), "stages[0].loss.hidden_at", "layer, mixer"),
    (lambda r: r["stages"][0]["loss"].update(hidden_at="mixer"), "stages[0].loss.hidden_at",
     "hidden_inputs: teacher_inputs"),
    (lambda r: (r["stages"][0]["loss"].update(hidden_at="mixer", hidden_inputs="teacher_inputs"),
                r["stages"][0].update(gradient_checkpointing=True)), "stages[0].gradient_checkpointing",
     "leave gradient_checkpointing off"),
])
def test_malformed_recipe_gives_one_line_error_naming_the_field(tmp_path, mutate, field, words):
    recipe = _good(tmp_path)
    mutate(recipe)
    path = S.write_recipe(tmp_path / "bad.yaml", recipe)
    result = CliRunner().invoke(main, ["train", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: {field}:") and words in lines[0], lines[0]


@pytest.mark.parametrize("key, value, field, words", [
    ("stages[0].grad_clip", "-1", "stages[0].grad_clip", ">= 0"),
    ("stages[0].lr", ".nan", "stages[0].lr", "finite"),
    ("stages[0].lr", ".inf", "stages[0].lr", "finite"),
    ("stages[0].lr", "-1e-3", "stages[0].lr", "positive"),
    ("stages[0].min_lr", ".nan", "stages[0].min_lr", "finite"),
    ("stages[0].min_lr", "-1e-5", "stages[0].min_lr", ">= 0"),
    ("stages[1].min_lr", "1.0", "stages[1].min_lr", "must not exceed lr"),
    ("stages[0].loss.hidden_mse", "-1", "stages[0].loss.hidden_mse", ">= 0"),
    ("stages[1].loss.kl", ".nan", "stages[1].loss.kl", "finite"),
    ("stages[1].loss.ce", "-.inf", "stages[1].loss.ce", "finite"),
    ("stages[1].loss.temperature", "0", "stages[1].loss.temperature", "positive"),
    ("stages[1].loss.temperature", ".nan", "stages[1].loss.temperature", "finite"),
    ("stages[0].warmup_steps", "-1", "stages[0].warmup_steps", ">= 0"),
    ("stages[0].dense_len", "-8", "stages[0].dense_len", ">= 0"),
    ("stages[0].weight_decay", "-0.1", "stages[0].weight_decay", ">= 0"),
    ("stages[0].steps", "-4", "stages[0].steps", "positive"),
    ("stages[0].seq_len", "0", "stages[0].seq_len", "positive"),
    ("stages[0].micro_batch_size", "-2", "stages[0].micro_batch_size", "positive"),
    ("stages[0].global_batch_tokens", "-128", "stages[0].global_batch_tokens", "positive"),
    ("stages[1].eval_every", "0", "stages[1].eval_every", "positive"),
    ("stages[1].eval_sequences", "-1", "stages[1].eval_sequences", ">= 0"),
    ("stages[0].decay_fraction", "0", "stages[0].decay_fraction", "(0, 1]"),
    ("stages[0].betas", "[0.9, 1.0]", "stages[0].betas[1]", "[0, 1)"),
    ("stages[0].betas", "[-0.1, 0.95]", "stages[0].betas[0]", "[0, 1)"),
    ("stages[0].lora.r", "0", "stages[0].lora.r", "positive"),
    ("stages[0].lora.dropout", "1.5", "stages[0].lora.dropout", "[0, 1)"),
    ("seed", "-1", "seed", ">= 0"),
    ("output.dir", "''", "output.dir", "must not be empty"),
    ("output.checkpoint_every", "-2", "output.checkpoint_every", "positive"),
    ("output.keep_last", "0", "output.keep_last", "positive"),
    ("logging.log_every", "0", "logging.log_every", "positive"),
    ("data.heldout_fraction", "1.0", "data.heldout_fraction", "[0, 1)"),
    ("data.sources[0].weight", ".nan", "data.sources[0].weight", "finite"),
    ("data.sources[0].num_samples", "-3", "data.sources[0].num_samples", "positive"),
    ("data.sources[0].max_new_tokens", "0", "data.sources[0].max_new_tokens", "positive"),
    ("data.sources[0].max_documents", "-1", "data.sources[0].max_documents", "positive"),
    ("data.sources[0].temperature", "0", "data.sources[0].temperature", "positive"),
])
def test_out_of_range_values_are_refused_on_load_naming_file_and_field(tmp_path, key, value, field, words):
    path = S.write_recipe(tmp_path / "r.yaml", _good(tmp_path))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [f"{key}={value}"])
    message = str(err.value)
    assert message.startswith(f"{path}: {field}: ") and words in message and "\n" not in message, message


def test_out_of_range_value_through_the_cli_is_one_line(tmp_path):
    path = S.write_recipe(tmp_path / "r.yaml", _good(tmp_path))
    result = CliRunner().invoke(main, ["train", str(path), "--set", "stages[0].grad_clip=-1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {path}: stages[0].grad_clip: must be >= 0, got -1.0"


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("stages: [\n  name: x\n")
    r = CliRunner().invoke(main, ["train", str(bad)])
    assert r.exit_code == 2 and "broken.yaml: line" in r.output and "not valid YAML" in r.output
    r = CliRunner().invoke(main, ["train", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "not found" in r.output


def test_set_overrides_apply_before_validation(tmp_path):
    path = S.write_recipe(tmp_path / "r.yaml", _good(tmp_path))
    recipe = load_recipe(path, ["stages[1].lr=2e-4", "output.dir=elsewhere", "stages[0].loss.hidden_layers=lightning",
                                "data.sources[0].weight=3"])
    assert recipe.stages[1].lr == 2e-4 and recipe.output.dir == "elsewhere"
    assert recipe.stages[0].loss.hidden_layers == "lightning" and recipe.data.sources[0].weight == 3.0
    with pytest.raises(RecipeError, match=r"stages\[0\]\.schedule"):
        load_recipe(path, ["stages[0].schedule=sometimes"])
    with pytest.raises(RecipeError, match="no list item 5"):
        load_recipe(path, ["stages[5].lr=1"])


def test_set_one_past_the_end_appends_a_data_source(tmp_path):
    path = S.write_recipe(tmp_path / "r.yaml", _good(tmp_path))
    n = len(load_recipe(path).data.sources)
    added = '{"type":"teacher","unprompted":true,"num_samples":3,"max_new_tokens":5,"min_new_tokens":5}'
    recipe = load_recipe(path, [f"data.sources[{n}]={added}"])
    assert len(recipe.data.sources) == n + 1
    new = recipe.data.sources[n]
    assert (new.type, new.unprompted, new.num_samples, new.min_new_tokens) == ("teacher", True, 3, 5)
    # a stage's data_weights must then name the new source too
    with pytest.raises(RecipeError, match=rf"data_weights: give one weight per data source \({n + 1}\)"):
        load_recipe(path, [f"data.sources[{n}]={added}", f"stages[0].data_weights={[1.0] * n}"])
    with pytest.raises(RecipeError, match=rf"no list item {n + 1} there \({n} items; index {n} appends\)"):
        load_recipe(path, [f"data.sources[{n + 1}]={added}"])


def test_batch_plan_derives_micro_batches_and_accumulation(tmp_path):
    recipe = load_recipe(S.write_recipe(tmp_path / "r.yaml", _good(tmp_path)), ["stages[0].global_batch_tokens=512",
                                                                                 "stages[0].tokens=5000",
                                                                                 "stages[0].steps=null"])
    plan = plan_stage(recipe.stages[0], world_size=2)
    assert (plan.sequences_per_step, plan.per_process, plan.micro_batch, plan.accumulation) == (16, 8, 2, 4)
    assert plan.steps == math.ceil(5000 / 512)
    with pytest.raises(RecipeError, match="do not split over 3 processes"):
        plan_stage(recipe.stages[0], world_size=3)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd", "exponential"])
def test_schedules_warm_up_then_reach_their_end_points(schedule):
    kw = dict(total=110, lr=1e-3, min_lr=1e-5, schedule=schedule, warmup=10, decay_fraction=0.2)
    assert lr_at(0, **kw) == pytest.approx(1e-4) and lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    end = lr_at(110, **kw)
    assert end == pytest.approx(1e-3 if schedule == "constant" else 1e-5)
    mid = lr_at(60, **kw)  # halfway through the decay part
    expected = {"constant": 1e-3, "cosine": 1e-5 + (1e-3 - 1e-5) / 2, "linear": (1e-3 + 1e-5) / 2,
                "wsd": 1e-3, "exponential": math.sqrt(1e-3 * 1e-5)}[schedule]
    assert mid == pytest.approx(expected)
    if schedule == "wsd":  # decays only in the last 20% of the 100 post-warmup steps
        assert lr_at(90, **kw) == pytest.approx(1e-3) and lr_at(100, **kw) == pytest.approx((1e-3 + 1e-5) / 2)


def test_data_sources_cache_heldout_and_mixture(tmp_path):
    from transformers import AutoTokenizer

    docs = S.write_documents(tmp_path / "docs", count=5)
    src = S.make_tiny_source(tmp_path / "src", docs, layers=1)
    tok = AutoTokenizer.from_pretrained(src)
    rows = [{"text": f"record {i}: " + "to be or not to be " * (i + 1)} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import pandas as pd

    pd.DataFrame({"body": [r["text"].upper() for r in rows]}).to_parquet(tmp_path / "rows.parquet")
    recipe = _good(tmp_path)
    recipe["data"] = {"sources": [
        {"type": "text", "path": str(docs), "weight": 3},
        {"type": "jsonl", "path": str(tmp_path / "rows.jsonl"), "weight": 1},
        {"type": "parquet", "path": str(tmp_path / "rows.parquet"), "field": "body", "weight": 1, "heldout": True},
    ], "heldout_fraction": 0.3, "cache_dir": str(tmp_path / "cache")}
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data
    corpus = build_corpus(spec, tok, seed=0)
    assert len(corpus.train) == 2 and corpus.train[0].num_docs + 0 < 5  # some text documents held out
    n_cached = len(list((tmp_path / "cache").glob("tokens-*.npz")))
    assert n_cached == 3
    again = build_corpus(spec, tok, seed=0)  # from the cache: identical tokens
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(corpus.train, again.train))
    # the held-out documents appear nowhere in training
    held_text = tok.decode(corpus.heldout.ids)
    assert "TO BE OR NOT" in held_text
    first_doc = tok.decode(corpus.train[1].ids[corpus.train[1].offsets[0]:corpus.train[1].offsets[1]])
    assert first_doc.startswith("record") and tok.eos_token in tok.decode(corpus.train[1].ids)
    # mixture: sources drawn in proportion to their weights, each read in a fresh order per pass
    packed = [pack(t, 16) for t in corpus.train]
    stream = MixtureStream(packed, [3, 1], seed=0)
    srcs = [0 if any(np.array_equal(stream[i][0], row) for row in packed[0].tokens) else 1 for i in range(400)]
    assert 0.68 < srcs.count(0) / 400 < 0.82
    assert all(np.array_equal(stream[i][0], MixtureStream(packed, [3, 1], seed=0)[i][0]) for i in (0, 77, 399))
    far = MixtureStream(packed, [3, 1], seed=0)
    late = far[9000]  # looking far ahead first must not change earlier positions (resume jumps straight to a cursor)
    assert all(np.array_equal(far[i][0], stream[i][0]) for i in range(400))
    assert np.array_equal(late[0], stream[9000][0])
    # each source is read in a fresh order per pass: every sequence once before any repeats
    from hybridize.train.data import PackedSequences

    rows = [PackedSequences(np.arange(40, dtype=np.int32).reshape(10, 4), [np.array([0])] * 10),
            PackedSequences(1000 + np.arange(12, dtype=np.int32).reshape(3, 4), [np.array([0])] * 3)]
    mix = MixtureStream(rows, [3, 1], seed=5)
    drawn = [int(mix[i][0][0]) for i in range(200)]
    small = [d for d in drawn if d >= 1000]
    big = [d for d in drawn if d < 1000]
    assert sorted(small[:3]) == [1000, 1004, 1008] and sorted(big[:10]) == list(range(0, 40, 4))
    assert small[:3] != small[3:6] or big[:10] != big[10:20]  # a new order on the next pass (seeded)


def test_hf_source_reads_a_load_dataset_path(tmp_path):
    from transformers import AutoTokenizer

    docs = S.write_documents(tmp_path / "docs", count=2)
    src = S.make_tiny_source(tmp_path / "src", docs, layers=1)
    tok = AutoTokenizer.from_pretrained(src)
    data = tmp_path / "my_dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"body": f"line {i} of the corpus"}) for i in range(5)))
    recipe = _good(tmp_path)
    recipe["data"] = {"sources": [{"type": "hf", "path": str(data), "split": "train", "field": "body"}],
                      "cache_dir": str(tmp_path / "cache")}
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data
    corpus = build_corpus(spec, tok, seed=0)
    assert corpus.train[0].num_docs == 5
    assert tok.decode(corpus.train[0].ids).startswith("line 0 of the corpus")
    recipe["data"]["sources"][0]["field"] = "text"
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data
    with pytest.raises(ValueError, match="no field 'text'"):
        build_corpus(spec, tok, seed=0)


def test_teacher_generated_source(tmp_path):
    import torch

    _, tok, teacher = S.tiny_teacher(tmp_path)
    recipe = _good(tmp_path)
    recipe["data"] = {"sources": [{"type": "teacher", "prompts": ["ROMEO.", "JULIET."], "num_samples": 3,
                                   "max_new_tokens": 12}], "cache_dir": str(tmp_path / "cache")}
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data
    torch.manual_seed(0)
    corpus = build_corpus(spec, tok, seed=0, teacher=teacher, teacher_key="tiny")
    assert corpus.train[0].num_docs == 3
    text = tok.decode(corpus.train[0].ids)
    assert text.count("ROMEO.") == 2 and text.count("JULIET.") == 1
    assert len(corpus.train[0].ids) > 3 * 12  # prompts plus sampled continuations
    # cached: the second build needs no teacher
    assert np.array_equal(build_corpus(spec, tok, seed=0, teacher=None, teacher_key="tiny").train[0].ids,
                          corpus.train[0].ids)


@pytest.mark.parametrize("name", ["sala.yaml", "demo.yaml", "smollm2-gpu.yaml", "retention.yaml"])
def test_shipped_recipes_validate(name):
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / name)
    assert recipe.stages and all(plan_stage(s, 1).steps > 0 for s in recipe.stages)
    assert recipe.needs_teacher()


def test_every_recipe_field_is_documented_in_recipes_readme():
    """recipes/README.md documents the schema: every field of every recipe section appears there in backticks."""
    import dataclasses
    import re
    from pathlib import Path

    from hybridize.train import recipe as r

    doc = (Path(__file__).resolve().parents[1] / "recipes" / "README.md").read_text()
    documented = set(re.findall(r"`([a-z_\.\[\]0-9]+)`", doc))
    words = {w.split(".")[-1] for w in documented} | documented
    missing = []
    for cls in (r.Recipe, r.ModelSpec, r.TeacherSpec, r.DataSpec, r.SourceSpec, r.StageSpec, r.LossSpec, r.LoraSpec,
                r.OutputSpec, r.LoggingSpec, r.HubSpec):
        for f in dataclasses.fields(cls):
            if f.name != "source_file" and f.name not in words:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"recipes/README.md does not document {missing}"
    for value in r.SCHEDULES + r.PRESETS + r.SOURCE_TYPES + r.PRECISIONS + r.HIDDEN_INPUTS:
        assert f"`{value}`" in doc, value
