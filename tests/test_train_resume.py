"""Resume reproduces the uninterrupted loss trajectory (fp32, fixed seed): after an in-process interruption, and after
SIGTERM sent to a `hybridize train` subprocess mid-stage. Also: checkpoints are pruned, the export loads."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test_train_support as S
from hybridize.train.checkpoint import list_checkpoints, read_state
from hybridize.train.recipe import recipe_from_dict
from hybridize.train.trainer import TrainingInterrupted, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return S.tiny_assets(tmp_path_factory, "train_resume")


def _losses(output: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["global_step"], r["loss"]) for r in lines]


@pytest.fixture(scope="module")
def uninterrupted(assets):
    root, docs, src = assets
    recipe = S.tiny_recipe(src, docs, root / "full", root / "cache")
    recipe["output"]["checkpoint_every"] = 2
    result = train(recipe_from_dict(recipe))
    return recipe, result


def test_uninterrupted_run_exports_a_loadable_model_and_prunes_checkpoints(uninterrupted):
    from transformers import AutoModelForCausalLM

    recipe, result = uninterrupted
    out = Path(recipe["output"]["dir"])
    assert [s for s, _ in _losses(out)] == list(range(1, 9))
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 2 and read_state(ckpts[-1])["stage_done"] and read_state(ckpts[-1])["stage"] == 1
    model = AutoModelForCausalLM.from_pretrained(result.model_dir, trust_remote_code=True)
    for n, p in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[n], p), n
    card = (result.model_dir / "README.md").read_text()
    assert "| align | 32 | 4 | 512 |" in card and "Total training tokens: 1,024" in card


@pytest.mark.parametrize("stop_at", [2, 6])  # mid-stage in the first stage, and in the second
def test_resume_after_interruption_reproduces_the_trajectory(assets, uninterrupted, stop_at):
    root, docs, src = assets
    recipe = dict(uninterrupted[0], output={**uninterrupted[0]["output"], "dir": str(root / f"cut{stop_at}")})

    def interrupt(step, record):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: checkpoint, then TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(recipe_from_dict(recipe), on_step=interrupt)
    out = Path(recipe["output"]["dir"])
    assert read_state(list_checkpoints(out)[-1])["global_step"] == stop_at
    with pytest.raises(FileExistsError, match="--resume"):
        train(recipe_from_dict(recipe))
    train(recipe_from_dict(recipe), resume=True)
    expected = _losses(Path(uninterrupted[0]["output"]["dir"]))
    got = _losses(out)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (s, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), f"step {s}"


def test_resume_after_a_hard_crash_drops_the_steps_after_the_checkpoint(assets, uninterrupted, tmp_path):
    root, docs, src = assets
    recipe = dict(uninterrupted[0], output={**uninterrupted[0]["output"], "dir": str(tmp_path / "crash")})

    def crash(step, record):
        if step == 3:  # checkpoint_every 2: the last checkpoint is at step 2
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train(recipe_from_dict(recipe), on_step=crash)
    assert [s for s, _ in _losses(tmp_path / "crash")] == [1, 2, 3]
    train(recipe_from_dict(recipe), resume=True)
    expected = _losses(Path(uninterrupted[0]["output"]["dir"]))
    got = _losses(tmp_path / "crash")
    assert [s for s, _ in got] == list(range(1, 9))
    assert [a for _, a in got] == pytest.approx([b for _, b in expected], rel=1e-6)


def test_sigterm_to_a_training_process_checkpoints_and_resume_matches(assets, tmp_path):
    root, docs, src = assets
    recipe = S.tiny_recipe(src, docs, tmp_path / "run", root / "cache")
    recipe["stages"] = [dict(recipe["stages"][0], steps=40, name="long")]
    recipe["output"]["export"] = False
    path = S.write_recipe(tmp_path / "recipe.yaml", recipe)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "hybridize.cli", "train", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "stopped: interrupted at stage 'long'" in out
    cut = read_state(list_checkpoints(tmp_path / "run")[-1])["step"]
    assert 3 <= cut < 40
    train(recipe_from_dict(recipe), resume=True)
    resumed = _losses(tmp_path / "run")
    assert [s for s, _ in resumed] == list(range(1, 41))
    recipe["output"] = dict(recipe["output"], dir=str(tmp_path / "straight"))
    train(recipe_from_dict(recipe))
    for (s, a), (_, b) in zip(resumed, _losses(tmp_path / "straight")):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), f"step {s}"


def test_non_finite_loss_stops_naming_step_and_checkpoint_or_skips(assets, tmp_path):
    from hybridize.train.trainer import NonFiniteLossError

    root, docs, src = assets
    stage = {"name": "boom", "seq_len": 32, "global_batch_tokens": 64, "steps": 4, "lr": 1e30, "grad_clip": None,
             "schedule": "constant", "trainable": "all", "loss": {"ce": 1.0}}
    recipe = S.tiny_recipe(src, docs, tmp_path / "stop", root / "cache", stages=[stage])
    recipe["output"].update(checkpoint_every=1, export=False)
    with pytest.raises(NonFiniteLossError) as err:
        train(recipe_from_dict(recipe))
    msg = str(err.value)
    good = _losses(tmp_path / "stop")  # the steps before the bad one, all finite
    bad = len(good) + 1
    assert 1 < bad <= 4 and all(math.isfinite(x) for _, x in good)
    assert f"stage 'boom' step {bad}" in msg and f"checkpoint-{bad - 1:07d}" in msg, msg
    assert (tmp_path / "stop" / "checkpoints" / f"checkpoint-{bad - 1:07d}").is_dir()
    recipe["output"]["dir"] = str(tmp_path / "skip")
    recipe["on_nonfinite"] = "skip"
    result = train(recipe_from_dict(recipe))  # the weights stay broken, so every later batch is skipped too
    assert [bool(h.get("skipped")) for h in result.history] == [False] * (bad - 1) + [True] * (5 - bad)


def test_push_to_hub_hands_the_exported_folder_to_the_hub_client(assets, tmp_path, monkeypatch):
    from unittest import mock

    root, docs, src = assets
    recipe = S.tiny_recipe(src, docs, tmp_path / "pushed", root / "cache")
    recipe["stages"] = recipe["stages"][:1]
    recipe["push_to_hub"] = {"repo_id": "me/trained-hybrid", "private": True}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = mock.Mock()
    api.create_commit.return_value = mock.Mock(commit_url="https://huggingface.co/me/trained-hybrid/commit/1")
    with mock.patch("huggingface_hub.HfApi", return_value=api):  # the network boundary only
        result = train(recipe_from_dict(recipe))
    api.create_repo.assert_called_once_with("me/trained-hybrid", private=True, exist_ok=True, repo_type="model")
    uploaded = {op.path_in_repo for op in api.create_commit.call_args.kwargs["operations"]}
    on_disk = {p.name for p in result.model_dir.iterdir() if p.is_file()}
    assert {"model.safetensors", "config.json", "modeling_hybridize.py", "recipe.json", "README.md"} <= uploaded
    assert uploaded == on_disk
