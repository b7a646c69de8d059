"""`hybridize train` under DeepSpeed ZeRO-2 (Accelerate's DeepSpeed integration, one process on the CPU): the same loss
trajectory as the plain loop (fp32, fixed seed), resume after SIGTERM mid-stage included, float32 weights exported; and
the configurations it cannot run are refused with a one-line error. Each DeepSpeed run is a subprocess, because
Accelerate's state is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_train_support as S
from hybridize.train.recipe import recipe_from_dict
from hybridize.train.trainer import train

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("one_thread")

RUNNER = r'''
import json, os, signal, sys
from pathlib import Path
# what `accelerate launch --use_deepspeed --zero_stage N --num_processes 1` sets for the process it starts
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3],
                  ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=sys.argv[2])
from hybridize.train.recipe import recipe_from_dict
from hybridize.train.trainer import TrainingInterrupted, train

recipe = json.loads(Path(sys.argv[1]).read_text())
if len(sys.argv) > 4:  # refusals: the recipe as given, then each variant named on the command line
    variants = {"as-is": {}, "lora": {"stages": [dict(recipe["stages"][0], trainable="lora")]},
                "skip": {"on_nonfinite": "skip"}, "shard": {"teacher": dict(recipe["teacher"], shard=True)}}
    for name in sys.argv[4:]:
        try:
            train(recipe_from_dict(dict(recipe, **variants[name])))
            print("RAN:", name)
        except ValueError as e:
            print("REFUSED:", name, e)
    sys.exit(0)
def interrupt(step, record):
    if step == 6:
        os.kill(os.getpid(), signal.SIGTERM)
try:
    train(recipe_from_dict(recipe), on_step=interrupt)
except TrainingInterrupted as e:
    print("INTERRUPTED:", e)
from hybridize.train.checkpoint import latest_checkpoint
print("CHECKPOINT", sorted(p.name for p in latest_checkpoint(Path(recipe["output"]["dir"])).iterdir()))
result = train(recipe_from_dict(recipe), resume=True)
print("DONE", result.model_dir)
'''


def _run(tmp_path: Path, recipe: dict, mode: str, port: str, *refusals: str) -> str:
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    (tmp_path / "runner.py").write_text(RUNNER)
    root = str(Path(__file__).resolve().parents[1])  # the checkout, importable also where it is not installed
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "recipe.json"), mode, port,
                           *refusals],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _metrics(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def test_zero2_reproduces_the_plain_trajectory_and_resumes(tmp_path):
    from safetensors.torch import load_file

    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs)
    recipe = S.tiny_recipe(src, docs, tmp_path / "plain", tmp_path / "cache")
    recipe["output"]["checkpoint_every"] = 2
    train(recipe_from_dict(recipe))
    recipe["output"]["dir"] = str(tmp_path / "ds")
    out = _run(tmp_path, recipe, "2", "29611")
    assert "INTERRUPTED" in out and "DONE" in out
    saved = next(x for x in out.splitlines() if x.startswith("CHECKPOINT"))
    assert "pytorch_model" in saved and "zero_to_fp32.py" in saved  # the engine's own checkpoint: DeepSpeed ran
    plain, ds = _metrics(tmp_path / "plain"), _metrics(tmp_path / "ds")
    assert [r["global_step"] for r in ds] == [r["global_step"] for r in plain] == list(range(1, 9))
    for a, b in zip(plain, ds):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["global_step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["global_step"]
        if "heldout_loss" in a:
            assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=1e-5)
    weights = load_file(str(tmp_path / "ds" / "model" / "model.safetensors"))
    reference = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    assert weights.keys() == reference.keys()
    for name, w in weights.items():
        assert w.dtype == reference[name].dtype
        assert (w - reference[name]).abs().max() <= 1e-4 * (1 + reference[name].abs().max()), name


@pytest.mark.parametrize("zero,variants,expected", [
    ("3", ["as-is"], {"as-is": ("ZeRO-3", "fsdp.yaml")}),
    ("2", ["lora", "skip", "shard"], {"lora": ("lora", "DeepSpeed"), "skip": ("on_nonfinite: skip", "stop"),
                                      "shard": ("teacher.shard", "shard: false")}),
])
def test_what_deepspeed_cannot_run_is_refused_with_a_one_line_error(tmp_path, zero, variants, expected):
    docs = S.write_documents(tmp_path / "docs", count=2)
    src = S.make_tiny_source(tmp_path / "src", docs)
    recipe = S.tiny_recipe(src, docs, tmp_path / "out", tmp_path / "cache")
    out = _run(tmp_path, recipe, zero, "29612" if zero == "3" else "29613", *variants)
    for name, words in expected.items():
        line = [x for x in out.splitlines() if x.startswith(f"REFUSED: {name} ")]
        assert line, out[-2000:]
        assert all(w in line[0] for w in words), line[0]
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "checkpoints").exists()
