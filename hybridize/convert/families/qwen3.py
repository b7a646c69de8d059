"""Qwen3: the Llama block with per-head RMSNorm on q and k (before RoPE) and an explicit head_dim."""

from __future__ import annotations

from .base import Family


class Qwen3Family(Family):
    model_type = "qwen3"
    label = "Qwen3"

    def hybrid_options(self, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qk_norm": True, "qkv_bias": bias, "o_bias": bias}


FAMILY = Qwen3Family()
