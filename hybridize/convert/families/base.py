"""What a family adapter is: the few things in which a Llama-block family differs from Llama itself."""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import UnsupportedArchitectureError


class Family:
    """Llama's own behaviour; families override what differs.

    - `hybrid_options(config)`: HybridConfig switches the family's attention needs (biases, q/k norms).
    - `to_llama(name, tensor, config)`: the family's tensor names -> Llama's names (fused tensors are split here).
    - `check(config)`: refuse configurations the hybrid cannot reproduce, with a one-line reason.
    - `notes(config)`: what the conversion changes that a user should know (printed, not fatal).
    """

    model_type = "llama"
    label = "Llama"

    def hybrid_options(self, config) -> dict:
        return {}

    def to_llama(self, name: str, tensor: torch.Tensor, config) -> Iterator[tuple[str, torch.Tensor]]:
        yield name, tensor

    def notes(self, config) -> list[str]:
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type") == "longrope":
            return [f"{self.label}: longrope is kept with its short factors at every length (the source switches to "
                    "its long factors beyond original_max_position_embeddings)"]
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            return [f"{self.label}: sliding-window layers are not kept as such: the hybrid's layers see the whole context"]
        return []

    def check(self, config) -> None:
        factor = getattr(config, "partial_rotary_factor", None)
        if factor is None:
            factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        if factor not in (None, 1, 1.0):
            raise UnsupportedArchitectureError(
                f"{self.label} with partial_rotary_factor={factor} is not supported: the hybrid applies RoPE to the "
                "whole head dimension"
            )
