"""Phi-3 / Phi-3.5: the Llama block with q, k, v fused into `qkv_proj` and gate, up fused into `gate_up_proj`."""

from __future__ import annotations

from typing import Iterator

import torch

from .base import Family


class Phi3Family(Family):
    model_type = "phi3"
    label = "Phi-3"

    def to_llama(self, name: str, tensor: torch.Tensor, config) -> Iterator[tuple[str, torch.Tensor]]:
        prefix, _, leaf = name.partition(".self_attn.qkv_proj.")
        if leaf:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            q = config.num_attention_heads * head_dim
            kv = config.num_key_value_heads * head_dim
            q_part, k_part, v_part = torch.split(tensor, [q, kv, kv], dim=0)
            for proj, part in (("q_proj", q_part), ("k_proj", k_part), ("v_proj", v_part)):
                yield f"{prefix}.self_attn.{proj}.{leaf}", part
            return
        prefix, _, leaf = name.partition(".mlp.gate_up_proj.")
        if leaf:
            gate, up = tensor.chunk(2, dim=0)  # Phi3MLP: first half is the gate
            yield f"{prefix}.mlp.gate_proj.{leaf}", gate
            yield f"{prefix}.mlp.up_proj.{leaf}", up
            return
        yield name, tensor


FAMILY = Phi3Family()
