"""Committed benchmark results name no machine's folders, and the benchmark scripts write them that way."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:root|tmp|work|home|mnt|scratch)/")


def _portable():
    spec = importlib.util.spec_from_file_location("bench_portable", BENCH / "portable.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_hold_no_absolute_machine_paths():
    found = {p.name: MACHINE_PATH.findall(p.read_text()) for p in BENCH.rglob("*.json")}
    assert {k: v for k, v in found.items() if v} == {}


def test_recorded_text_loses_absolute_paths_only():
    clean = _portable().without_machine_paths
    assert clean("python bench/bench_model.py --out /root/out/bm --lengths 128K") == \
        "python bench/bench_model.py --out <dir>/bm --lengths 128K"
    assert clean("/root/tq/smollm2.gguf converted with sparse layers [0, 5]") == \
        "<dir>/smollm2.gguf converted with sparse layers [0, 5]"
    assert clean("data.cache_dir=/tmp/cache_a") == "data.cache_dir=<dir>/cache_a"
    for kept in ("37,170 tokens/s", "ratio 1/3", "runs/hybrid", "fwd/bwd"):
        assert clean(kept) == kept
