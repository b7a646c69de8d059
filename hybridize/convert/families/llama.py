"""Llama 1, 2, 3, 3.1-3.3 (incl. `llama3` / linear / dynamic rope scaling, optional attention and MLP biases)."""

from __future__ import annotations

from .base import Family


class LlamaFamily(Family):
    model_type = "llama"
    label = "Llama 1-3.x"


FAMILY = LlamaFamily()
