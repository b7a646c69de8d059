"""Family adapters, one small module each: adding a family is one module here and one test."""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from . import llama, mistral, phi3, qwen2, qwen3
from .base import Family

FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in (llama, mistral, qwen2, qwen3, phi3)}


def supported() -> str:
    return ", ".join(f"{f.label} ({key})" for key, f in FAMILIES.items())


def family_for(model_type: str | None, where: str = "the config") -> Family:
    """The adapter for a config's model_type; a one-line error listing the supported ones otherwise."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} in {where}: supported are {supported()}"
        )
    return family


__all__ = ["FAMILIES", "Family", "family_for", "supported"]
