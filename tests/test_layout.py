"""The repository layout the kernels rely on.

`hybridize/kernels` is a symlink to the top-level `kernels/` folder (pyproject.toml). An editable install made from
another checkout (a second worktree, say) would import THAT checkout's kernels, silently testing old code; and since
the symlink makes `git add hybridize` skip the kernel files, edits could be left unstaged. These checks fail loudly
instead (CONTRIBUTING.md, "The kernels/ symlink").
"""

from __future__ import annotations

import importlib
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
    here = Path(hybridize.kernels.__file__).resolve().parent
    assert here == KERNELS.resolve(), (
        f"hybridize.kernels imports from {here}, not from this repository's {KERNELS}: set PYTHONPATH={ROOT}")
    assert (ROOT / "hybridize" / "kernels").resolve() == KERNELS.resolve(), "hybridize/kernels must link to kernels/"


def test_every_kernel_file_imports_through_hybridize_kernels():
    names = sorted(p.stem for p in KERNELS.glob("*.py") if p.name != "__init__.py")
    assert names, "no kernel files found"
    for name in names:
        module = importlib.import_module(f"hybridize.kernels.{name}")
        assert Path(module.__file__).resolve() == (KERNELS / f"{name}.py").resolve()


def test_no_kernel_file_over_the_line_limit():
    long = {p.name: n for p in KERNELS.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"kernel files over {MAX_LINES} lines (split them by stage): {long}"
