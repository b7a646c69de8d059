"""Mistral: the Llama block with GQA and an optional sliding window.

The sliding window is not carried over: every converted layer is Lightning (recurrent) or sparse attention, both of
which see the whole context; within the window the sparse layers compute what the source computed."""

from __future__ import annotations

from .base import Family


class MistralFamily(Family):
    model_type = "mistral"
    label = "Mistral"

    def notes(self, config) -> list[str]:
        window = getattr(config, "sliding_window", None)
        dropped = [f"Mistral's sliding window ({window} tokens) is not kept: the hybrid's layers see the whole context"]
        return super().notes(config) + (dropped if window else [])


FAMILY = MistralFamily()
