"""A key/value cache for the teacher's `generate` that writes each step into buffers allocated once.

transformers' default cache concatenates every layer's keys and values with the new token's at each step, so a step
reads and writes the whole cache once more than attention itself needs, and allocates a new, larger tensor per layer
and step. Sampling the training text (thousands of samples of up to 2K tokens at once) is then bound by those copies
(2026-12-02, H200: 2,048 samples of 2,047 tokens took 277 s). This layer keeps a buffer of the final length per layer
and returns views of its filled part: the same keys and values, so the same tokens for the same random draws.
"""

from __future__ import annotations

from functools import partial

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicCache, DynamicLayer

# The keyword `generate` takes a cache by: renamed in transformers 5.24 (the old name still works there, with a warning)
GENERATE_CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers of `capacity` positions, filled in place."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self._kbuf = key_states.new_empty(B, H, self.capacity, D)
        self._vbuf = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
        self.keys, self.values = self._kbuf[:, :, :0], self._vbuf[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self.filled, self.filled + key_states.shape[-2]
        if stop > self.capacity:
            raise ValueError(f"the key/value buffer holds {self.capacity} positions; {stop} were asked for")
        self._kbuf[:, :, start:stop] = key_states
        self._vbuf[:, :, start:stop] = value_states
        self.filled = stop
        self.keys, self.values = self._kbuf[:, :, :stop], self._vbuf[:, :, :stop]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a buffered cache only grows (sampling never crops it)")


def buffered_cache(capacity: int) -> DynamicCache:
    """A cache for one `generate` call of at most `capacity` positions (prompt and new tokens)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = partial(BufferedLayer, capacity)
    return cache


__all__ = ["GENERATE_CACHE_KWARG", "BufferedLayer", "buffered_cache"]
