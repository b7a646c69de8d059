"""Write a hybrid model as a self-contained Hugging Face folder.

The folder holds config.json (with `auto_map`), safetensors weights, the generation config, the tokenizer when given,
and the architecture and kernel files side by side, so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works where hybridize is not installed.
Writes go to a temporary sibling folder that is renamed into place at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import hybridize.kernels as _kernels

from . import arch as _arch

ARCH_FILES = ("configuration_hybridize.py", "modeling_hybridize.py", "cache_hybridize.py", "ops.py")
AUTO_MAP = {
    "AutoConfig": "configuration_hybridize.HybridConfig",
    "AutoModel": "modeling_hybridize.HybridModel",
    "AutoModelForCausalLM": "modeling_hybridize.HybridForCausalLM",
}


def architecture_files() -> list[Path]:
    """The files every exported folder carries: the architecture and every kernel module (flat)."""
    arch_dir = Path(_arch.__file__).parent
    kernel_dir = Path(_kernels.__file__).parent
    files = [arch_dir / name for name in ARCH_FILES]
    files += sorted(p for p in kernel_dir.glob("*.py") if p.name != "__init__.py")
    return files


def copy_architecture(folder: Path) -> None:
    for src in architecture_files():
        shutil.copyfile(src, folder / src.name)


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_folder(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output`; on success it replaces `output`, on failure it is removed."""
    output = Path(output)
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists: choose another --output or pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        old = output.with_name(f".{output.name}.old-{tmp.name[-8:]}")
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output)


def save_hybrid(model, output: str | Path, tokenizer=None, force: bool = False, max_shard_size: str = "2GB") -> Path:
    """Save `model` (a HybridForCausalLM) with everything needed to load it anywhere."""
    model.config.auto_map = dict(AUTO_MAP)
    with atomic_folder(output, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        copy_architecture(tmp)
    return Path(output)
