"""Write a hybrid model as a self-contained Hugging Face folder.

The folder holds config.json (with `auto_map`), safetensors weights, the generation config, the tokenizer when given,
and the architecture and kernel files side by side, so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works where hybridize is not installed.
Writes go to a temporary sibling folder that is renamed into place at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import hybridize.kernels as _kernels

from . import arch as _arch

ARCH_FILES = ("configuration_hybridize.py", "modeling_hybridize.py", "cache_hybridize.py", "decode_graphs.py",
              "ops.py")
AUTO_MAP = {
    "AutoConfig": "configuration_hybridize.HybridConfig",
    "AutoModel": "modeling_hybridize.HybridModel",
    "AutoModelForCausalLM": "modeling_hybridize.HybridForCausalLM",
}


TRAINING_KERNELS = ("loss_triton.py",)  # the trainer's losses: nothing a loaded model runs


def architecture_files() -> list[Path]:
    """The files every exported folder carries: the architecture and every kernel module the model runs (flat)."""
    arch_dir = Path(_arch.__file__).parent
    kernel_dir = Path(next(iter(_kernels.__path__)))  # a namespace package: no __init__.py (tests/test_layout.py)
    files = [arch_dir / name for name in ARCH_FILES]
    files += sorted(p for p in kernel_dir.glob("*.py") if p.name not in TRAINING_KERNELS)
    return files


def copy_architecture(folder: Path) -> None:
    for src in architecture_files():
        shutil.copyfile(src, folder / src.name)


class OutputExistsError(FileExistsError):
    pass


def is_hybrid_folder(folder: Path) -> bool:
    """A model folder hybridize wrote: its config.json says model_type 'hybridize'."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "hybridize"
    except (OSError, ValueError, AttributeError):
        return False


def holds(name: str):
    """A test for `atomic_folder(ours=...)`: the folder holds the file `name` (what one command always writes)."""
    return lambda folder: (Path(folder) / name).is_file()


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(output: str | Path, *, force: bool = False, ours=is_hybrid_folder, inputs=()) -> Path:
    """One-line errors for an output that must not be replaced: the current folder or one above it, an input or a
    folder holding one, an existing path without `force`, or (even with `force`) a non-empty folder that `ours` does
    not recognise as this command's own output."""
    output = Path(output)
    target = output.resolve()
    if _contains(target, Path.cwd().resolve()):
        raise ValueError(f"the output {output} is the current folder or holds it, which replacing it would delete: "
                         "give the name of a new folder instead")
    for given in inputs:
        if given is not None and Path(given).exists() and _contains(target, Path(given).resolve()):
            raise ValueError(f"the output {output} is or holds the input {given}, which replacing it would delete: "
                             "choose another --output")
    if not (output.exists() or output.is_symlink()):
        return output
    if not force:
        raise OutputExistsError(f"{output} already exists: choose another --output or pass --force to replace it")
    if output.is_dir() and not output.is_symlink() and any(output.iterdir()) and not ours(output):
        raise OutputExistsError(f"{output} is not empty and not an output of this hybridize command, so --force "
                                "will not replace it: choose another --output (or remove it yourself)")
    return output


_TEMP_KINDS = ("tmp", "old")  # .NAME.tmp-PID-XXXX: being written; .NAME.old-PID-XXXX: being replaced


def _hidden_name(output: Path, kind: str, tag: str) -> str:
    return f".{output.name}.{kind}-{tag}"


def sweep_stale(output: Path) -> None:
    """Remove temporary folders beside `output` that runs killed outright (SIGKILL, power loss) left behind. The
    pid in the name tells a dead run's folder from a live one's; nothing that does not match the pattern is touched."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(?:{'|'.join(_TEMP_KINDS)})-(\d+)-[a-z0-9_]+")
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _alive(int(match.group(1))):
            _remove(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move `src` to `dst` unless `dst` exists by then. A plain rename(2) silently replaces an empty folder, and an
    exists-check before it races with a second run writing the same output; renameat2 checks atomically."""
    exists = OutputExistsError(f"{dst} appeared while this run was writing it (another run?): it was left as it "
                               "is; choose another --output or pass --force to replace it")
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not glibc/Linux: fall back to check-then-rename
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise exists
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: this file system or kernel lacks the flag
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise exists
    os.rename(src, dst)


def _move_into_place(tmp: Path, output: Path, force: bool) -> None:
    if force and (output.exists() or output.is_symlink()):
        old = output.with_name(_hidden_name(output, "old", tmp.name.rsplit(".tmp-", 1)[1]))
        output.rename(old)
        tmp.rename(output)
        _remove(old)
    else:
        _rename_noreplace(tmp, output)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _naming_output(e: OSError, tmp: Path, output: Path) -> OSError | None:
    """The same error naming the user's output instead of the hidden temporary folder (None: not a write error)."""
    if e.errno is None:
        return None
    if e.errno in _WRITE_ERRNOS or tmp.name in str(e):
        return OSError(e.errno, f"cannot write {output}: {e.strerror or e}")
    return None


@contextlib.contextmanager
def atomic_folder(output: str | Path, force: bool = False, *, ours=is_hybrid_folder, inputs=()) -> Iterator[Path]:
    """Yield a temporary folder beside `output`; on success it replaces `output`, on failure it is removed. `ours`
    tells a folder that `force` may replace (this command's own earlier output); `inputs` may not be replaced."""
    output = check_output(output, force=force, ours=ours, inputs=inputs)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(output)
        tmp = Path(tempfile.mkdtemp(prefix=_hidden_name(output, "tmp", f"{os.getpid()}-"), dir=output.parent))
    except OSError as e:
        raise OSError(e.errno, f"cannot write {output}: {e.strerror or e}") from None
    try:
        yield tmp
        _move_into_place(tmp, output, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        renamed = _naming_output(e, tmp, output) if isinstance(e, OSError) else None
        if renamed is not None:
            raise renamed from None
        raise


def save_hybrid(model, output: str | Path, tokenizer=None, force: bool = False, max_shard_size: str = "2GB") -> Path:
    """Save `model` (a HybridForCausalLM) with everything needed to load it anywhere."""
    model.config.auto_map = dict(AUTO_MAP)
    with atomic_folder(output, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        copy_architecture(tmp)
    return Path(output)
