"""`hybridize push`: the exact upload (files and card) with only the Hub client (HfApi) mocked."""

import json
from unittest import mock

import pytest
from click.testing import CliRunner

from eval_tools import word_tokenizer
from helpers import tiny_llama
from hybridize.arch.configuration_hybridize import default_layer_types
from hybridize.cli import main
from hybridize.convert.build import build_hybrid
from hybridize.export import save_hybrid
from hybridize.hub import HubError, push_folder


@pytest.fixture
def folder(tmp_path):
    tok = word_tokenizer()
    model = build_hybrid(tiny_llama(vocab=len(tok)), default_layer_types(4))
    model.config.conversion = {"source": "SmolLM2-135M-Instruct (built-in default, GGUF)", "method": "uniform",
                               "ratio": "1:3"}
    path = save_hybrid(model, tmp_path / "tiny-hybrid", tokenizer=tok)
    (path / "README.md").write_text("---\nlibrary_name: transformers\n---\n# tiny-hybrid\n\nConverted by a test.\n")
    (path / "recipe.json").write_text(json.dumps({"stages": [{"name": "align", "seq_len": 64, "tokens": 4096,
                                                               "lr": 1e-3, "train": "lightning"}]}))
    (path / "eval").mkdir()
    (path / "eval" / "eval_results.md").write_text("## Evaluation\n\n| metric | tiny-hybrid | source |\n|---|---|---|\n"
                                                   "| perplexity (shakespeare, 512 tokens x 8) | 31.2 | 20.5 |\n")
    (path / "eval" / "eval_results.json").write_text("{}")
    (path / "eval" / "retrieval_heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (path / "__pycache__").mkdir()
    (path / "__pycache__" / "x.pyc").write_bytes(b"0")
    (path / ".tiny-hybrid.tmp-abc").mkdir()
    (path / ".tiny-hybrid.tmp-abc" / "junk").write_text("x")
    return path


def _expected_files(folder):
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    files = {f for f in files if not f.startswith(("__pycache__", ".tiny-hybrid.tmp"))}
    return sorted(files)


def test_push_uploads_exactly_the_folder_and_the_card(folder, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    api = mock.Mock()
    api.create_commit.return_value = mock.Mock(commit_url="https://huggingface.co/me/tiny/commit/1")
    with mock.patch("huggingface_hub.HfApi", return_value=api) as cls:
        url = push_folder(folder, "me/tiny", private=True, revision="v1", token="hf_test")
    cls.assert_called_once_with(token="hf_test")
    assert url.endswith("/commit/1")
    api.create_repo.assert_called_once_with("me/tiny", private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_called_once_with("me/tiny", branch="v1", exist_ok=True, repo_type="model")
    kwargs = api.create_commit.call_args.kwargs
    assert kwargs["revision"] == "v1"
    ops = kwargs["operations"]
    uploaded = [op.path_in_repo for op in ops]
    assert uploaded == _expected_files(folder)
    assert {"config.json", "model.safetensors", "modeling_hybridize.py", "tokenizer.json", "README.md",
            "eval/eval_results.md", "eval/retrieval_heatmap.png"} <= set(uploaded)
    card = next(op for op in ops if op.path_in_repo == "README.md").path_or_fileobj
    card = card if isinstance(card, bytes) else card.read()
    text = card.decode()
    front = text.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: text-generation" in front
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front and "- hybridize" in front
    assert "Converted by a test." in text  # the folder's own card is kept as the body
    assert "LLLS" in text  # the layer map of default_layer_types(4)
    assert "| align | 64 | 4096 |" in text  # how it was trained
    assert "| perplexity (shakespeare, 512 tokens x 8) | 31.2 | 20.5 |" in text
    assert "![retrieval_heatmap](eval/retrieval_heatmap.png)" in text
    assert (folder / "README.md").read_text().startswith("---\nlibrary_name")  # the folder itself is untouched


def test_dry_run_needs_no_token_and_lists_the_files(folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with mock.patch("huggingface_hub.HfApi") as cls:
        res = CliRunner().invoke(main, ["push", str(folder), "me/tiny", "--dry-run"])
    assert res.exit_code == 0, res.output
    cls.assert_not_called()
    listing = res.output.split("--- README.md ---")[0]
    listed = [line.split()[0] for line in listing.splitlines() if line.startswith("  ")]
    assert listed == _expected_files(folder)
    assert "--- README.md ---" in res.output and "pipeline_tag: text-generation" in res.output


def test_missing_token_offline_and_network_errors_are_one_line(folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    with mock.patch("huggingface_hub.HfApi") as cls:
        res = CliRunner().invoke(main, ["push", str(folder), "me/tiny"])
        cls.assert_not_called()
    assert res.exit_code == 2 and res.output.startswith("error: no Hugging Face token") and res.output.count("\n") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(main, ["push", str(folder), "me/tiny", "--token", "hf_x"])
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.output
    monkeypatch.delenv("HF_HUB_OFFLINE")
    api = mock.Mock()
    api.create_repo.side_effect = ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")
    with mock.patch("huggingface_hub.HfApi", return_value=api):
        with pytest.raises(HubError, match="could not push to me/tiny .*Failed to resolve") as e:
            push_folder(folder, "me/tiny", token="hf_x")
    assert "\n" not in str(e.value)
    api.create_commit.assert_not_called()


def test_bad_repo_id_and_folder(folder, tmp_path):
    with pytest.raises(ValueError, match="user/name"):
        push_folder(folder, "no-slash", dry_run=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_folder(tmp_path / "empty", "me/x", dry_run=True)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on leaving: nothing listens there now


def test_push_without_network_is_one_line(folder, tmp_path):
    """A real push (no mocked client) against an endpoint nothing listens on: huggingface_hub 2.x raises httpx2
    errors, which must end as one line and exit code 2. Run in a subprocess: the endpoint is read at import."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("HF_HUB_OFFLINE", None)
    res = subprocess.run([sys.executable, "-m", "hybridize.cli", "push", str(folder), "me/tiny", "--token", "hf_x"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("error: could not push to me/tiny") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_push_refuses_a_folder_that_is_not_a_hybrid(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    res = CliRunner().invoke(main, ["push", str(tmp_path / "dense"), "me/dense", "--dry-run"])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "not a hybrid" in res.output and "'llama'" in res.output
