"""Qwen2 / Qwen2.5: the Llama block with biases on q, k and v (always) and none on o."""

from __future__ import annotations

from .base import Family


class Qwen2Family(Family):
    model_type = "qwen2"
    label = "Qwen2/2.5"

    def hybrid_options(self, config) -> dict:
        return {"qkv_bias": True, "o_bias": False}


FAMILY = Qwen2Family()
