"""The walkthrough notebook runs end to end (tiny random model of SmolLM2's shape family, HYBRIDIZE_TINY=1)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_TINY", "1")
    monkeypatch.setenv("HYBRIDIZE_WORKDIR", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 3  # layer scores, retrieval heat map, speed plot, inline
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "chosen sparse layers" in text and "would push" in text
    model = tmp_path / "out" / "run" / "model"
    assert (model / "config.json").is_file()
    assert (model / "eval" / "eval_results.json").is_file() and (model / "bench" / "bench_results.json").is_file()
