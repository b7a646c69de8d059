"""What `hybridize train` does when something is wrong: a recipe that no longer matches the run it resumes, damaged
checkpoints, undecodable data, an output.dir it cannot write, a full disk, stages longer than the source's context,
and failures before the first checkpoint (which leave no run folder behind)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import test_train_support as S
from hybridize.cli import main
from hybridize.train.checkpoint import list_checkpoints, read_state
from hybridize.train.recipe import recipe_from_dict
from hybridize.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return S.tiny_assets(tmp_path_factory, "train_failures")


def _recipe(assets, output: Path, **over) -> dict:
    """Two short cross-entropy stages (no teacher to load), a checkpoint every step."""
    root, docs, src = assets
    stages = [
        {"name": "a", "seq_len": 32, "global_batch_tokens": 64, "micro_batch_size": 2, "steps": 2, "lr": 1e-3,
         "schedule": "constant", "trainable": "all", "loss": {"ce": 1.0}},
        {"name": "b", "seq_len": 32, "global_batch_tokens": 64, "micro_batch_size": 1, "steps": 3, "lr": 5e-4,
         "schedule": "constant", "trainable": "all", "loss": {"ce": 1.0}},
    ]
    recipe = S.tiny_recipe(src, docs, output, root / "cache", stages=stages)
    recipe["data"]["heldout_fraction"] = 0.0
    recipe["output"].update(checkpoint_every=1, keep_last=2)
    recipe.update(over)
    return recipe


@pytest.fixture(scope="module")
def crashed(assets):
    """A run that crashed at global step 4 (stage b, step 2): checkpoints at global steps 2 (end of stage a) and 3
    (stage b, mid-stage, with optimizer state)."""
    root = assets[0]
    recipe = _recipe(assets, root / "crashed")

    def crash(step, record):
        if step == 4:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train(recipe_from_dict(recipe), on_step=crash)
    ckpts = list_checkpoints(root / "crashed")
    assert [read_state(c)["global_step"] for c in ckpts] == [2, 3]
    return recipe


def _copy_run(crashed, tmp_path) -> tuple[dict, Path]:
    out = tmp_path / "run"
    shutil.copytree(crashed["output"]["dir"], out)
    recipe = copy.deepcopy(crashed)
    recipe["output"]["dir"] = str(out)
    return recipe, out


def _cli(tmp_path, recipe, *args):
    path = S.write_recipe(tmp_path / "recipe.yaml", recipe)
    return path, CliRunner().invoke(main, ["train", str(path), *args])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    # model loading may draw a progress bar first; the error is one line, the last, and nothing else is an error
    errors = [x for x in lines if x.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.output, result.output
    return errors[0]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------------------------------
# --resume with another recipe (defect 3)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (lambda r, a: r.update(stages=r["stages"][:1]), "stages: 2 in the checkpoint, 1 now"),
    (lambda r, a: r["stages"][1].update(lr=1e-2), "stages[1].lr: 0.0005 in the checkpoint, 0.01 now"),
    (lambda r, a: r["stages"][0].update(loss={"ce": 1.0, "kl": 1.0}), "stages[0].loss.kl: 0.0 in the checkpoint"),
    (lambda r, a: r["model"].update(source=str(a[0] / "elsewhere")), "model.source: "),
    (lambda r, a: r.update(seed=7), "seed: 1 in the checkpoint, 7 now"),
])
def test_resume_refuses_a_recipe_that_no_longer_matches_the_checkpoint(assets, crashed, tmp_path, change, words):
    recipe, out = _copy_run(crashed, tmp_path)
    change(recipe, assets)
    before = _snapshot(out)
    path, result = _cli(tmp_path, recipe, "--resume")
    line = _one_error_line(result)
    assert line.startswith(f"error: {path}: ") and words in line and "another recipe" in line, line
    assert _snapshot(out) == before  # nothing written, nothing exported


def test_resume_accepts_changes_that_do_not_define_the_run(assets, crashed, tmp_path):
    recipe, out = _copy_run(crashed, tmp_path)
    recipe["stages"][1]["micro_batch_size"] = 2
    recipe["logging"] = {"progress": False, "log_every": 3}
    recipe["output"].update(keep_last=3, export=False)
    path, result = _cli(tmp_path, recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert read_state(list_checkpoints(out)[-1])["global_step"] == 5


def test_resume_accepts_a_checkpoint_from_before_a_field_existed_while_it_holds_its_default(assets, crashed,
                                                                                           tmp_path):
    """A checkpoint written by an older version has no entry for a field added since: it resumes while the recipe
    leaves that field at its default, and is refused, naming the field, when the recipe sets it."""
    from hybridize.train.checkpoint import STATE_FILE

    recipe, out = _copy_run(crashed, tmp_path)
    for ckpt in list_checkpoints(out):
        state = json.loads((ckpt / STATE_FILE).read_text())
        for stage in state["recipe"]["stages"]:
            del stage["join_documents"], stage["document_separator"]
        del state["recipe"]["data"]["sources"][0]["start_token"]
        (ckpt / STATE_FILE).write_text(json.dumps(state))
    changed = copy.deepcopy(recipe)
    changed["stages"][1]["join_documents"] = True
    line = _one_error_line(_cli(tmp_path, changed, "--resume")[1])
    assert "stages[1].join_documents: '(absent)' in the checkpoint, True now" in line, line
    path, result = _cli(tmp_path, recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert read_state(list_checkpoints(out)[-1])["global_step"] == 5


def test_resume_without_a_checkpoint_says_so(assets, tmp_path):
    recipe = _recipe(assets, tmp_path / "never-ran")
    path, result = _cli(tmp_path, recipe, "--resume")
    line = _one_error_line(result)
    assert "holds no checkpoint" in line and "without --resume" in line
    assert not (tmp_path / "never-ran").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints (defect 7)
# ---------------------------------------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "weights-truncated": lambda c: _truncate(c / "model.safetensors"),
    "optimizer-truncated": lambda c: _truncate(c / "optimizer.bin"),
    "state-empty": lambda c: (c / "trainer_state.json").write_text(""),
    "state-empty-mapping": lambda c: (c / "trainer_state.json").write_text("{}"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(crashed, tmp_path, corruption):
    recipe, out = _copy_run(crashed, tmp_path)
    older, newest = list_checkpoints(out)
    CORRUPTIONS[corruption](newest)
    recipe["output"]["export"] = False
    path, result = _cli(tmp_path, recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resuming from the older {older}" in result.output and newest.name in result.output
    steps = [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # stage b ran again from its start
    assert read_state(list_checkpoints(out)[-1])["global_step"] == 5


def test_no_usable_checkpoint_is_one_line_naming_the_newest(crashed, tmp_path):
    recipe, out = _copy_run(crashed, tmp_path)
    older, newest = list_checkpoints(out)
    _truncate(newest / "model.safetensors")
    (older / "trainer_state.json").write_text("{}")
    path, result = _cli(tmp_path, recipe, "--resume")
    line = _one_error_line(result)
    assert str(newest / "model.safetensors") in line and "no older checkpoint" in line, line


# ---------------------------------------------------------------------------------------------------------------------
# Data, output.dir, disk (defect 8) and failed runs (defect 15)
# ---------------------------------------------------------------------------------------------------------------------
def test_invalid_utf8_in_a_data_file_names_the_file_and_encoding(assets, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("plain text " * 50)
    (docs / "latin.txt").write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 50)
    recipe = _recipe(assets, tmp_path / "run")
    recipe["data"].update(sources=[{"type": "text", "path": str(docs)}], cache_dir=str(tmp_path / "cache"))
    path, result = _cli(tmp_path, recipe)
    line = _one_error_line(result)
    assert str(docs / "latin.txt") in line and "not valid utf-8" in line and "encoding:" in line, line
    assert not (tmp_path / "run").exists()


def test_output_dir_under_a_file(assets, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    recipe = _recipe(assets, tmp_path / "a-file" / "run")
    path, result = _cli(tmp_path, recipe)
    line = _one_error_line(result)
    assert line.startswith(f"error: {path}: output.dir: ") and "is a file" in line, line
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_not_writable(assets, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        path, result = _cli(tmp_path, _recipe(assets, locked / "run"))
    finally:
        locked.chmod(0o755)
    line = _one_error_line(result)
    assert "output.dir" in line and "not writable" in line


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_is_one_line_and_removes_what_the_run_created(assets, tmp_path):
    """metrics.jsonl is a link to /dev/full, where every write fails with ENOSPC: the disk is full for real."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    path, result = _cli(tmp_path, _recipe(assets, out))
    line = _one_error_line(result)
    assert "No space left on device" in line, line
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]  # the folder was there before: it stays


def test_failure_before_the_first_checkpoint_leaves_no_run_folder(assets, tmp_path):
    recipe = _recipe(assets, tmp_path / "run")
    recipe["output"]["checkpoint_every"] = None

    def crash(step, record):
        raise RuntimeError("late failure")

    with pytest.raises(RuntimeError, match="late failure"):
        train(recipe_from_dict(recipe), on_step=crash)
    assert not (tmp_path / "run").exists()
    # a folder that existed before stays, with what it held; only the run's own files go
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="late failure"):
        train(recipe_from_dict(recipe), on_step=crash)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_failure_after_a_checkpoint_keeps_the_run(crashed):
    out = Path(crashed["output"]["dir"])
    assert (out / "recipe.json").is_file() and (out / "metrics.jsonl").is_file() and len(list_checkpoints(out)) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Context length (defect 13)
# ---------------------------------------------------------------------------------------------------------------------
def _long_stage(**over) -> dict:
    return {"name": "long", "seq_len": 1024, "global_batch_tokens": 1024, "steps": 1, "lr": 1e-4,
            "schedule": "constant", "trainable": "all", "loss": {"ce": 1.0}, **over}


def test_stage_past_the_source_context_is_refused(assets, tmp_path):
    recipe = _recipe(assets, tmp_path / "run")
    recipe["stages"] = recipe["stages"][:1] + [_long_stage()]
    path, result = _cli(tmp_path, recipe)
    line = _one_error_line(result)
    assert line.startswith(f"error: {path}: stages[1].seq_len: 1024 is past the source model's context (512"), line
    assert "past_source_context: true" in line
    assert not (tmp_path / "run").exists()


def test_past_source_context_true_trains_with_one_note(assets, tmp_path):
    recipe = _recipe(assets, tmp_path / "run")
    recipe["stages"] = [_long_stage(past_source_context=True), _long_stage(name="longer", past_source_context=True)]
    recipe["output"].update(export=False, checkpoint_every=None)
    path, result = _cli(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    notes = [x for x in result.output.splitlines() if "past the source model's context" in x]
    assert len(notes) == 1 and "'long' (1024)" in notes[0] and "'longer' (1024)" in notes[0], result.output


@pytest.mark.parametrize("max_pos, rope, expected", [
    (512, {"rope_type": "default", "rope_theta": 10000.0}, 512),
    (4096, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 16384),
    (32768, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32768},
     131072),
    (131072, {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 131072),
])
def test_source_context_counts_rope_scaling(max_pos, rope, expected):
    from transformers import LlamaConfig

    from hybridize.train.plan import source_context

    assert source_context(LlamaConfig(max_position_embeddings=max_pos, rope_parameters=rope)) == expected


def _memory_limited(model, fits):
    """The model as it behaves on an accelerator where only inputs with `fits(input_ids)` fit: a larger one raises
    torch's own out-of-memory error before any work (a CPU has no such limit to meet for real)."""

    def check(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and not fits(ids):
            raise torch.OutOfMemoryError(f"{tuple(ids.shape)} does not fit")

    model.register_forward_pre_hook(check, with_kwargs=True)
    return model


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_update(assets, tmp_path, capsys):
    """A micro-batch that does not fit is halved until it does (4 -> 2 -> 1 here), with the same global batch: the run
    trains the same weights as one written with micro-batch 1. What does not fit at one sequence is one line."""
    from hybridize.train.models import load_models
    from hybridize.train.trainer import StageDoesNotFit

    def run(name: str, micro: int, limit: int | None):  # limit: sequences of 16 tokens per forward
        recipe = _recipe(assets, tmp_path / name)
        recipe["stages"] = [dict(recipe["stages"][0], seq_len=16, micro_batch_size=micro, steps=3)]
        recipe["output"]["checkpoint_every"] = None
        spec = recipe_from_dict(recipe)
        student, teacher, tok, desc = load_models(spec, need_teacher=False)
        if limit is not None:  # the student reads a micro-batch packed into one row
            _memory_limited(student, lambda ids: ids.numel() <= limit * 16)
        return train(spec, models=(student, teacher, tok, desc))

    plain = run("plain", 1, None)
    shrunk = run("shrunk", 4, 1)
    said = capsys.readouterr().out
    assert "micro-batch 4 ran out of accelerator memory; continuing with 2" in said
    assert "micro-batch 2 ran out of accelerator memory; continuing with 1" in said
    assert [h["loss"] for h in shrunk.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-5)
    want = dict(plain.model.named_parameters())
    for name, p in shrunk.model.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(StageDoesNotFit, match=r"stage 'a' \(stages\[0\]\): one sequence of 16 tokens .*"
                                              r"stages\[0\]\.gradient_checkpointing: true"):
        run("none", 2, 0)
    assert not (tmp_path / "none").exists()


def test_teacher_sampling_halves_its_batch_when_out_of_memory(tmp_path):
    """A teacher source's batch_size written for a smaller teacher: sampling goes on in halves and writes the same
    documents as a run written with the batch that fits; a teacher that cannot sample one sequence is one line."""
    from hybridize.train.data import generate_documents
    from hybridize.train.recipe import SourceSpec

    _, tok, teacher = S.tiny_teacher(tmp_path)
    prompts = ["ROMEO.", "JULIET.", "NURSE.", "TYBALT.", "FRIAR."]

    def sample(batch: int, limit: int | None = None):
        src = SourceSpec(type="teacher", prompts=prompts, num_samples=5, max_new_tokens=6, batch_size=batch)
        model = teacher if limit is None else _memory_limited(copy.deepcopy(teacher), lambda ids: len(ids) <= limit)
        return generate_documents(model, tok, src, seed=3, progress=False)

    fits = sample(2)
    assert sample(8, limit=2) == fits and len(fits) == 5
    with pytest.raises(ValueError, match="sampling one sequence of 6 new tokens: lower max_new_tokens"):
        sample(2, limit=0)
