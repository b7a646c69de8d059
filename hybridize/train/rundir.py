"""The run's output folder: checked before any work, cleaned after a failure that left nothing to resume from, and
its metrics log cut back to the checkpoint a resumed run continues from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checkpoint import checkpoint_dir, list_checkpoints
from .recipe import RecipeError


def check_output_dir(output: Path, file: str) -> None:
    """Fail before any work when output.dir cannot be created or written (under a file, read-only, no permission)."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(f"{file}: output.dir: {output} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"{file}: output.dir: {existing} is not writable (read-only or no permission): choose "
                          "another output.dir")


def created_by_this_run(output: Path) -> list[Path]:
    """What a run may create in output.dir that is not there yet (the folder itself when it does not exist)."""
    if not output.exists():
        return [output]
    return [p for p in (output / "recipe.json", output / "metrics.jsonl", output / "logs", checkpoint_dir(output))
            if not p.exists()]


def remove_failed_run(output: Path, created: list[Path]) -> None:
    """After a failure before the first checkpoint, what the run created holds nothing to resume from: remove it,
    and only it (a folder that existed before stays)."""
    if list_checkpoints(output):
        return
    for path in created:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def trim_metrics(path: Path, upto: int) -> None:
    """Drop the records after global step `upto`: a resumed run runs (and logs) those steps again."""
    if not path.is_file():
        return
    keep = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["global_step"] <= upto]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)
