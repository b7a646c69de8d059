"""The loop under a real 2-process Accelerate run (torchrun, gloo on CPU) gives the same loss trajectory as one
process at the same global batch: each step's sequences and the loss normalisation do not depend on the world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import test_train_support as S
from hybridize.train.recipe import recipe_from_dict
from hybridize.train.trainer import train


def test_two_processes_match_one(tmp_path):
    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs)
    recipe = S.tiny_recipe(src, docs, tmp_path / "one", tmp_path / "cache")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(recipe_from_dict(recipe))
    finally:
        torch.set_num_threads(old)
    recipe["output"]["dir"] = str(tmp_path / "two")
    path = S.write_recipe(tmp_path / "recipe.yaml", recipe)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hybridize.cli", "train", str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 8  # written once (main process only)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["global_step"]
        if "heldout_loss" in a:
            assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=1e-5)
    assert (tmp_path / "two" / "model" / "config.json").is_file()


def test_retention_recipe_parts_under_two_processes(tmp_path):
    """Teacher-written text, layers placed by a scoring method, distillation on joined documents with another
    separator, and a final stage with its own data mixture, recall copies and the sparse path on: two processes follow
    one process's losses, and only the first scores the layers."""
    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs, layers=4)
    recipe = S.tiny_recipe(src, docs, tmp_path / "one", tmp_path / "cache1")
    recipe["model"].update(select="block_influence", hype=True)
    recipe["data"]["sources"] = [{"type": "teacher", "num_samples": 6, "max_new_tokens": 40, "batch_size": 3},
                                 {"type": "text", "path": str(docs)}]
    recipe["stages"][1].update(join_documents=True, document_separator="a")
    recipe["stages"].append({"name": "long", "seq_len": 128, "global_batch_tokens": 256, "micro_batch_size": 1,
                             "steps": 2, "lr": 1e-4, "trainable": ["*.self_attn.*"], "sparse": True, "dense_len": 32,
                             "data_weights": [0.0, 1.0], "recall": 0.5, "recall_span": 16, "loss": {"ce": 1.0}})
    runs = {}
    for name, nproc in (("one", "1"), ("two", "2")):
        recipe["output"]["dir"] = str(tmp_path / name)
        recipe["data"]["cache_dir"] = str(tmp_path / f"cache_{name}")
        path = S.write_recipe(tmp_path / f"{name}.yaml", recipe)
        env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc,
                               "-m", "hybridize.cli", "train", str(path)], env=env, capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        said = proc.stdout + proc.stderr
        assert said.count("scoring layers (block_influence) once") == 1, said[-2000:]
    assert [r["stage"] for r in runs["one"]] == [r["stage"] for r in runs["two"]] and runs["one"][-1]["stage"] == "long"
    for a, b in zip(runs["one"], runs["two"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["stage"], a["global_step"])
    assert json.loads((tmp_path / "two" / "model" / "config.json").read_text())["hype"] is True
