"""Committed results must not name one machine's folders (/root/..., /tmp/...): they say nothing to a reader and
differ between runs of the same benchmark. Absolute paths in recorded text become <dir>/NAME."""

from __future__ import annotations

import re

# an absolute path: a "/" not inside a word or number (so "tokens/s" and "1/3" stay), then its components
_ABSOLUTE = re.compile(r"(?<![\w.~])/(?:[^\s/\"',;:=]+/)*([^\s/\"',;:=]+)")


def without_machine_paths(text: str) -> str:
    """'--out /root/out/bm' -> '--out <dir>/bm'; 'data.cache_dir=/tmp/c' -> 'data.cache_dir=<dir>/c'."""
    return _ABSOLUTE.sub(lambda m: f"<dir>/{m.group(1)}", text)
