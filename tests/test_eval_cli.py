"""`hybridize eval` and `hybridize bench` on the CPU: real model folders, real files, tables and plots."""

import json
import time

import pytest
import torch
from click.testing import CliRunner

from eval_tools import save_source_and_hybrid
from hybridize.cli import main
from hybridize.eval.evaluate import run_bench_command
from hybridize.eval.report import bench_table
from hybridize.eval.speed import selection_variant, shape_builders

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_source_and_hybrid(root)
    text = root / "text.txt"
    text.write_text("The river runs to the sea and the wind moves over the hills. The sky is blue. " * 30)
    return root


def test_eval_command_writes_side_by_side_results(folders):
    out = folders / "eval-out"
    args = ["eval", str(folders / "hybrid"), "--compare", str(folders / "source"), "--text", str(folders / "text.txt"),
            "--seq-len", "32", "--max-windows", "2", "--lengths", "64,96", "--depths", "0,1", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "eval_results.json").read_text())
    assert list(data["models"]) == ["hybrid", "source"]
    for m in data["models"].values():
        assert m["perplexity"][0]["windows"] == 2 and m["perplexity"][0]["perplexity"] > 1.0
        assert len(m["retrieval"]["probes"]) == 4 and len(m["samples"]) == 2
    md = (out / "eval_results.md").read_text()
    assert "| metric | hybrid | source |" in md
    assert (out / "retrieval_heatmap.png").read_bytes()[:8] == PNG
    # an existing folder is not overwritten without --force, and the error is one line with exit code 2
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and again.output.count("\n") == 1 and "--force" in again.output


def test_eval_bad_input_is_a_one_line_error(folders, tmp_path):
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error:") and not (tmp_path / "o").exists()
    res = CliRunner().invoke(main, ["eval", str(folders / "hybrid"), "--depths", "0,2", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "depths" in res.output and not (tmp_path / "o").exists()


def test_bench_shape_on_cpu_produces_table_and_plots(tmp_path):
    report, paths = run_bench_command(shape="tiny", lengths=(64, 128, 256), output=tmp_path / "b", chunk_size=48,
                                      decode_batches=(1, 2), decode_steps=2, log=None)
    names = [m["name"] for m in report["models"]]
    assert names == ["hybrid 1:3", "tiny (dense)"]
    hybrid, dense = report["models"]
    assert hybrid["kind"] == "hybrid" and dense["kind"] == "dense" and hybrid["params"] > dense["params"]
    for m in report["models"]:
        assert [r["length"] for r in m["results"]] == [64, 128, 256]
        for r in m["results"]:
            assert r["status"] == "ok" and r["ttft_s"] > 0
            assert set(r["decode_tok_s"]) == {1, 2} and all(v > 0 for v in r["decode_tok_s"].values())
    table = (tmp_path / "b" / "bench_results.md").read_text()
    assert table.count("\n| 64 |") + table.count("\n| 128 |") + table.count("\n| 256 |") == 3
    assert "TTFT s (hybrid 1:3) | TTFT s (tiny (dense)) | TTFT speed-up" in table
    for name in ("bench_ttft.png", "bench_decode.png"):
        assert (tmp_path / "b" / name).read_bytes()[:8] == PNG
    assert json.loads(paths["json"].read_text())["lengths"] == [64, 128, 256]


def test_bench_command_on_folders_and_time_cap(folders, tmp_path):
    res = CliRunner().invoke(main, ["bench", str(folders / "hybrid"), "--compare", str(folders / "source"),
                                    "--lengths", "32,64,1K", "--chunk-size", "32", "--decode-steps", "2",
                                    "--time-cap", "0", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "b" / "bench_results.json").read_text())
    for m in report["models"]:
        statuses = [r["status"] for r in m["results"]]
        assert statuses == ["ok", "skipped", "skipped"]  # a zero cap stops after the first measured length
    assert bench_table(report).splitlines()[2].startswith("| 32 |")


def test_bench_refuses_model_and_shape_together(folders, tmp_path):
    res = CliRunner().invoke(main, ["bench", str(folders / "hybrid"), "--shape", "tiny", "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "--shape" in res.output
    res = CliRunner().invoke(main, ["bench", "--shape", "nope", "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "llama3-8b" in res.output
    res = CliRunner().invoke(main, ["bench", "--shape", "tiny", "--lengths", "12Q", "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "128K" in res.output


def test_bench_table_ratios_and_oom_as_results():
    def res(length, ttft, tok_s, status="ok"):
        return {"length": length, "status": status, "ttft_s": ttft, "peak_gib": None, "decode_tok_s": {"1": tok_s}}

    report = {"lengths": [1024, 2048], "decode_batches": [1], "models": [
        {"name": "dense", "kind": "dense", "results": [res(1024, 8.0, 10.0), res(2048, None, None, "oom")]},
        {"name": "h-a", "kind": "hybrid", "results": [res(1024, 2.0, 40.0), res(2048, 5.0, 30.0)]},
        {"name": "h-b", "kind": "hybrid", "results": [res(1024, 4.0, 20.0)]},
    ]}
    lines = bench_table(report).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["context", "TTFT s (h-a)", "TTFT s (h-b)", "TTFT s (dense)"]
    assert header[4:6] == ["TTFT speed-up (h-a)", "TTFT speed-up (h-b)"]
    row1 = [c.strip() for c in lines[2].strip("|").split("|")]
    row2 = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row1[4:6] == ["4.00x", "2.00x"]  # source / hybrid
    assert row1[9:11] == ["4.00x", "2.00x"]  # decode: hybrid / source
    assert row2[3] == "oom" and row2[4] == "source OOM" and row2[2] == "-"


@pytest.mark.parametrize("warmup,first_prefill", [(None, 96), (0, 32)])
def test_a_hybrid_warms_up_at_its_longest_length_before_the_timed_prefills(folders, warmup, first_prefill):
    """By default the untimed warm-up of a hybrid prefills its longest length (every Triton variant and fused-piece
    shape of the timed prefills is met there); 0 turns it off, so the first prefill is the shortest timed one."""
    from transformers import AutoModelForCausalLM

    from hybridize.eval.speed import bench_model

    model = AutoModelForCausalLM.from_pretrained(folders / "hybrid", trust_remote_code=True)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        bench = bench_model("h", model, [32, 96], chunk_size=32, decode_batches=(1,), decode_steps=2,
                            warmup_length=warmup, progress=False)
    finally:
        hook.remove()
    assert [r.length for r in bench.results] == [32, 96] and all(r.status == "ok" for r in bench.results)
    first = next(i for i, n in enumerate(calls) if n == 1)  # the first decode step ends the first prefill
    assert sum(calls[:first]) == first_prefill


def test_bench_normalizer_option_builds_that_hybrid(tmp_path):
    """--normalizer picks the selection's softmax normaliser of the --shape hybrid (the config default: coarse)."""
    assert selection_variant(None, None) is None
    for choice, coarse in (("exact", False), ("coarse", True)):
        variants = selection_variant(None, choice)
        builders = shape_builders("tiny", "1:3", torch.float32, torch.device("cpu"), variants)
        name = next(n for n in builders if n.startswith("hybrid"))
        assert f"{choice} normaliser" in name
        assert builders[name]().config.sparse_coarse_normalizer is coarse
    default = shape_builders("tiny", "1:3", torch.float32, torch.device("cpu"))["hybrid 1:3"]()
    assert default.config.sparse_coarse_normalizer is True
    res = CliRunner().invoke(main, ["bench", "--shape", "tiny", "--normalizer", "exact", "--lengths", "64",
                                    "--decode-steps", "1", "--no-plots", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "b" / "bench_results.json").read_text())
    assert [m["name"] for m in report["models"]][0] == "hybrid 1:3 (exact normaliser selection)"
    res = CliRunner().invoke(main, ["bench", "--shape", "tiny", "--normalizer", "fast", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "exact" in res.output and not (tmp_path / "c").exists()


def test_decode_batches_need_not_divide_each_other_and_a_length_can_have_its_own():
    """Each decode batch is made from one row of the cache, so 2 then 3 both run (no "skipped"); `decode_at` gives a
    length its own batches, and the time cap can count from before the warm-up (`cap_from`)."""
    from hybridize.eval import speed

    model = shape_builders("tiny", "1:3", torch.float32, torch.device("cpu"))["hybrid 1:3"]()
    bench = speed.bench_model("h", model, [32, 64], chunk_size=32, decode_batches=(1,), decode_steps=1,
                              warmup_length=0, decode_at={64: (2, 3, 5)}, decode_warmup_steps=1)
    got = {r.length: sorted(r.decode_tok_s) for r in bench.results}
    assert got == {32: [1], 64: [2, 3, 5]}
    assert all(isinstance(v, float) for r in bench.results for v in r.decode_tok_s.values())
    capped = speed.bench_model("h", model, [32, 64], chunk_size=32, decode_batches=(1,), decode_steps=1,
                               warmup_length=0, time_cap_s=0.0, cap_from=time.perf_counter() - 100)
    assert [r.status for r in capped.results] == ["ok", "skipped"]
    assert speed.largest_fitting_length(model, torch.device("cpu"), 32, high=320) == 320  # no probe on the CPU


def test_decode_rate_is_the_median_step_so_one_slow_step_does_not_move_it(monkeypatch):
    """Decode tokens/s come from the median of individually timed steps: one step stalled by 0.5 s (an allocator
    growth, a host hiccup) leaves the rate at that of the other steps, where a total-time rate would drop ~5x."""
    from hybridize.eval import speed

    model = shape_builders("tiny", "1:3", torch.float32, torch.device("cpu"))["hybrid 1:3"]()
    real, calls = speed.forward_chunk, []

    def stalled_once(*a, **k):
        calls.append(1)
        if len(calls) == speed.DECODE_WARMUP_STEPS + 2:  # the second timed step
            time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(speed, "forward_chunk", stalled_once)
    r = speed.bench_length(model, 64, device=torch.device("cpu"), chunk_size=64, decode_batches=[1], decode_steps=5,
                           vocab=model.config.vocab_size)
    assert len(calls) == speed.DECODE_WARMUP_STEPS + 5
    # the median step (milliseconds here), not (4 steps + 0.5 s) / 5 steps, which is below 10 tokens/s
    assert r.decode_tok_s[1] > 1 / 0.06, r.decode_tok_s


# ---------------------------------------------------------------------------------------------------------------------
# Untrusted folders and bad input
# ---------------------------------------------------------------------------------------------------------------------
def _plant(folder, marker):
    """Make `folder` run Python that writes `marker` if anything imports its code: a dense folder gets an auto_map
    to modeling_evil.py (model and tokenizer), a hybrid folder a changed modeling_hybridize.py."""
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    if (folder / "modeling_hybridize.py").is_file():
        path = folder / "modeling_hybridize.py"
        path.write_text(path.read_text() + "\n" + payload)
        return
    (folder / "modeling_evil.py").write_text(payload)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"}
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))


@pytest.fixture
def planted(folders, tmp_path):
    import shutil

    for name in ("hybrid", "source"):
        shutil.copytree(folders / name, tmp_path / name)
        _plant(tmp_path / name, tmp_path / f"ran-{name}")
    return tmp_path


def test_eval_never_runs_python_files_from_the_folders(planted, folders):
    from hybridize.eval.loading import load_model

    res = CliRunner().invoke(main, ["eval", str(planted / "hybrid"), "--compare", str(planted / "source"), "--text",
                                    str(folders / "text.txt"), "--seq-len", "32", "--max-windows", "1",
                                    "--no-retrieval", "-o", str(planted / "out")])
    assert res.exit_code == 0, res.output
    loaded = load_model(str(planted / "source"))
    assert loaded.kind == "dense" and loaded.tokenizer is not None
    assert load_model(str(planted / "hybrid")).kind == "hybrid"
    assert sorted(p.name for p in planted.glob("ran-*")) == []


def _bad(args, out):
    res = CliRunner().invoke(main, [*map(str, args), "-o", str(out)])
    assert res.exit_code == 2, (res.output, res.exception)
    lines = [line for line in res.output.splitlines() if "error" in line.lower()]  # not transformers' progress bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_bad_device_is_a_one_line_error(folders, tmp_path, command):
    assert "cpu, cuda" in _bad([command, folders / "hybrid", "--device", "banana"], tmp_path / "o")
    if not torch.cuda.is_available():
        assert "--device cpu" in _bad([command, folders / "hybrid", "--device", "cuda"], tmp_path / "o")


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_truncated_weights_are_a_one_line_error(folders, tmp_path, command):
    import shutil

    shutil.copytree(folders / "hybrid", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    message = _bad([command, tmp_path / "cut", "--device", "cpu", "--lengths", "32"], tmp_path / "o")
    assert "cut" in message and "truncated" in message


def test_bench_decode_batch_zero_and_no_model_say_what_to_give(folders, tmp_path):
    message = _bad(["bench", folders / "hybrid", "--decode-batch", "0", "--lengths", "32", "--device", "cpu"],
                   tmp_path / "o")
    assert "--decode-batch" in message and "at least 1" in message
    message = _bad(["bench"], tmp_path / "o")
    assert "MODEL" in message and "--shape" in message and "not both" not in message


def test_eval_of_a_folder_without_tokenizer_says_so(folders, tmp_path):
    import shutil

    shutil.copytree(folders / "hybrid", tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bare" / name).unlink()
    message = _bad(["eval", tmp_path / "bare", "--no-retrieval", "--device", "cpu"], tmp_path / "o")
    assert "no tokenizer" in message and "tokenizer.json" in message


def test_eval_force_never_replaces_the_model_or_a_foreign_folder(folders, tmp_path):
    import shutil

    shutil.copytree(folders / "hybrid", tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "model"), "-o", str(tmp_path / "model"), "--force"])
    assert res.exit_code == 2 and "input" in res.output
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
