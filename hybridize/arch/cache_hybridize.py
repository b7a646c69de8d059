"""Generation cache of the hybrid model.

Per Lightning layer: the recurrent state (B, H, Dk, Dv), float32, constant size.
Per sparse layer: keys and values (B, Hkv, T, D) in the padded layout `generate` uses (left padding included), and
the compressed keys (B, Hkv, Nc, D) computed on each sequence's own tokens (padding excluded), appended as windows fill.

Left padding is recorded once, at prefill, as a per-sequence count; later steps only append real tokens.
"""

from __future__ import annotations

import torch

from .ops import compress_keys, num_compressed


class HybridCache:
    """Holds what decoding needs, layer by layer. Not a `transformers.Cache`: the state of a Lightning layer is not
    a key/value list, and keeping our own class keeps the cache stable across transformers releases."""

    is_compileable = False

    def __init__(self, config, batch_size: int | None = None):
        self.layer_types = list(config.layer_types)
        self.kernel = config.sparse_compress_kernel
        self.stride = config.sparse_compress_stride
        n = len(self.layer_types)
        self.states: list[torch.Tensor | None] = [None] * n
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.ckeys: list[torch.Tensor | None] = [None] * n
        self.pad: torch.Tensor | None = None  # (B,) left-padding count per sequence
        self.seq_len = 0  # tokens seen so far, padding included

    # --- bookkeeping -------------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def get_max_cache_shape(self, layer_idx: int = 0):
        return None

    def __len__(self) -> int:
        return len(self.layer_types)

    def set_padding(self, pad: torch.Tensor) -> None:
        """Left-padding counts, fixed by the first forward of a sequence (later masks only extend it)."""
        self.pad = pad

    def logical_lengths(self, total: int) -> torch.Tensor:
        return total - self.pad

    # --- Lightning layers --------------------------------------------------------------------------------------
    def lightning_state(self, layer_idx: int) -> torch.Tensor | None:
        return self.states[layer_idx]

    def set_lightning_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.states[layer_idx] = state

    # --- sparse layers -----------------------------------------------------------------------------------------
    def update_sparse(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Append new keys/values (B, Hkv, T, D); returns all keys, values and the compressed keys."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        keys = self.keys[layer_idx]
        total, old_total = keys.shape[2], keys.shape[2] - k.shape[2]
        self.ckeys[layer_idx] = self._append_compressed(self.ckeys[layer_idx], keys, old_total, total)
        return keys, self.values[layer_idx], self.ckeys[layer_idx]

    def _append_compressed(self, ck, keys, old_total, total):
        B, H, _, D = keys.shape
        new_len = self.logical_lengths(total).tolist()
        old_len = self.logical_lengths(old_total).clamp(min=0).tolist()
        pads = self.pad.tolist()
        want = max(num_compressed(n, self.kernel, self.stride) for n in new_len)
        if ck is None:
            ck = keys.new_zeros(B, H, want, D, dtype=torch.float32)
        elif ck.shape[2] < want:
            ck = torch.cat([ck, ck.new_zeros(B, H, want - ck.shape[2], D)], dim=2)
        for b in range(B):
            have = num_compressed(old_len[b], self.kernel, self.stride)
            need = num_compressed(new_len[b], self.kernel, self.stride)
            if need > have:
                start = pads[b] + have * self.stride
                stop = pads[b] + (need - 1) * self.stride + self.kernel
                ck[b, :, have:need] = compress_keys(keys[b : b + 1, :, start:stop], self.kernel, self.stride)[0]
        return ck

    def compressed_count(self, total: int) -> list[int]:
        return [num_compressed(n, self.kernel, self.stride) for n in self.logical_lengths(total).tolist()]

    # --- batch surgery used by generation utilities ------------------------------------------------------------
    def _map(self, fn) -> None:
        for store in (self.states, self.keys, self.values, self.ckeys):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = fn(t)
        if self.pad is not None:
            self.pad = fn(self.pad)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "the hybrid cache holds recurrent Lightning states, which cannot be rolled back "
            "(assisted generation and cache cropping are not supported)"
        )

    def memory_bytes(self) -> int:
        """Bytes held, for memory reports."""
        total = 0
        for store in (self.states, self.keys, self.values, self.ckeys):
            total += sum(t.numel() * t.element_size() for t in store if t is not None)
        return total


__all__ = ["HybridCache"]
