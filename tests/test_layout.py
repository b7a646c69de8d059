"""The repository layout the kernels rely on.

`hybridize/kernels` is a symlink to the top-level `kernels/` folder (pyproject.toml). An editable install made from
another checkout (a second worktree, say) would import THAT checkout's kernels, silently testing old code; and since
the symlink makes `git add hybridize` skip the kernel files, edits could be left unstaged. These checks fail loudly
instead (CONTRIBUTING.md, "The kernels/ symlink").
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import hybridize
import hybridize.kernels

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
MAX_LINES = 700


def test_hybridize_is_this_checkout():
    assert Path(hybridize.__file__).resolve().parent == (ROOT / "hybridize").resolve(), (
        f"hybridize imports from {hybridize.__file__}, not from this checkout {ROOT}: set PYTHONPATH={ROOT}")


def test_installed_kernels_are_this_repository_kernels_folder():
    here = Path(next(iter(hybridize.kernels.__path__))).resolve()
    assert here == KERNELS.resolve(), (
        f"hybridize.kernels imports from {here}, not from this repository's {KERNELS}: set PYTHONPATH={ROOT}")
    assert (ROOT / "hybridize" / "kernels").resolve() == KERNELS.resolve(), "hybridize/kernels must link to kernels/"


def test_every_kernel_file_imports_through_hybridize_kernels():
    names = sorted(p.stem for p in KERNELS.glob("*.py"))
    assert names, "no kernel files found"
    for name in names:
        module = importlib.import_module(f"hybridize.kernels.{name}")
        assert Path(module.__file__).resolve() == (KERNELS / f"{name}.py").resolve()


def test_no_kernel_file_over_the_line_limit():
    long = {p.name: n for p in KERNELS.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"kernel files over {MAX_LINES} lines (split them by stage): {long}"


def test_the_kernels_folder_never_shadows_the_hub_kernels_package():
    """`python -m pytest` (the README's test command) and `python -c` from the repository root put the root on
    sys.path. With an __init__.py there, `kernels/` would be a regular package named `kernels` and win over the
    Hugging Face `kernels` distribution that transformers (5.25) imports; without one it is at most a namespace
    portion, which an installed regular package always beats (PEP 420)."""
    assert not (KERNELS / "__init__.py").exists()
    imports = "import transformers.activations, hybridize.kernels.lightning_reference"
    done = subprocess.run([sys.executable, "-c", imports], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
