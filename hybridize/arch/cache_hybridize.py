"""Generation cache of the hybrid model.

Per Lightning layer: the recurrent state (B, H, Dk, Dv), float32, constant size; with `lightning_window` also the
keys and values of the softmax window branch, constant size too: each sequence's first `lightning_sinks` tokens and a
ring of its last `lightning_window` (B, Hkv, sinks + window, D), with the position each slot holds (-1: empty).
Per sparse layer: keys and values (B, Hkv, T, D) in the padded layout `generate` uses (left padding included), and
the compressed keys (B, Hkv, Nc, D) computed on each sequence's own tokens (padding excluded), appended as windows fill,
and with `sparse_coarse_normalizer` the coarse keys (B, Hkv, N2, D) built from them the same way, so that a decode step
does not rebuild them from the whole cache.

Left padding is recorded once, at prefill, as a per-sequence count (kept on the host too, so that decoding never
waits for the GPU); later steps only append real tokens.

Keys, values and compressed keys live in buffers with headroom (`_headroom`): a decode step writes one position in
place instead of copying the whole cache, and a buffer is reallocated only when its headroom is used up.

Decoding through CUDA graphs (decode_graphs.py), the Lightning states are the graph runner's buffers, updated in place
each step: hold a copy (`.clone()`), not the tensor, to keep a state of one step. Whatever replaces `states[i]`
(`reorder_cache`, `batch_select_indices`, an eager step) is copied into the buffers before the next replayed step.
"""

from __future__ import annotations

import torch

from .ops import coarse_compressed_keys, compress_keys, num_coarse, num_compressed, window_slots


def _headroom(need: int, incoming: int = 1) -> int:
    """Extra positions allocated beyond `need`: 1/8 of it, and at least twice the block being appended (a chunked
    prefill then reallocates, and copies what it holds, every other chunk or less often instead of at every chunk);
    at least 256, at most 65536, a multiple of 64."""
    extra = min(max(256, need // 8, 2 * incoming), 65536)
    return -(-extra // 64) * 64


def _write(buf: torch.Tensor | None, used: int, new: torch.Tensor) -> torch.Tensor:
    """`new` (B, H, T, D) written at positions used..used+T of buf along dim 2, reallocating with headroom when it
    does not fit (or when batch/heads changed); returns the buffer (possibly new)."""
    need = used + new.shape[2]
    if buf is None or need > buf.shape[2] or buf.shape[:2] != new.shape[:2] or buf.dtype != new.dtype:
        grown = new.new_empty(new.shape[0], new.shape[1], need + _headroom(need, new.shape[2]), new.shape[3])
        if buf is not None and used:
            grown[:, :, :used] = buf[:, :, :used]
        buf = grown
    buf[:, :, used:need] = new
    return buf


class HybridCache:
    """Holds what decoding needs, layer by layer. Not a `transformers.Cache`: the state of a Lightning layer is not
    a key/value list, and keeping our own class keeps the cache stable across transformers releases."""

    is_compileable = False

    def __init__(self, config, batch_size: int | None = None):
        self.layer_types = list(config.layer_types)
        self.kernel = config.sparse_compress_kernel
        self.stride = config.sparse_compress_stride
        # coarse keys (the selection's softmax normaliser), built from K1
        self.coarse = config.sparse_coarse_normalizer
        self.kernel2, self.stride2 = config.sparse_coarse_window
        n = len(self.layer_types)
        self.states: list[torch.Tensor | None] = [None] * n
        # Views of the filled part of the buffers below (what attention reads).
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.ckeys: list[torch.Tensor | None] = [None] * n
        self._kbuf: list[torch.Tensor | None] = [None] * n
        self._vbuf: list[torch.Tensor | None] = [None] * n
        self._cbuf: list[torch.Tensor | None] = [None] * n
        self.ckeys2: list[torch.Tensor | None] = [None] * n
        self._c2buf: list[torch.Tensor | None] = [None] * n
        self.window, self.sinks = config.lightning_window, config.lightning_sinks
        # the Lightning layers' window branch: keys, values (B, Hkv, sinks + window, D) and positions (B, sinks + window)
        self.window_keys: list[torch.Tensor | None] = [None] * n
        self.window_values: list[torch.Tensor | None] = [None] * n
        self.window_pos: list[torch.Tensor | None] = [None] * n
        self.pad: torch.Tensor | None = None  # (B,) left-padding count per sequence
        self.pad_list: list[int] = []  # the same counts on the host
        self.has_pad = False
        self.seq_len = 0  # tokens seen so far, padding included

    # --- bookkeeping -------------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def get_max_cache_shape(self, layer_idx: int = 0):
        return None

    def __len__(self) -> int:
        return len(self.layer_types)

    def set_padding(self, pad: torch.Tensor) -> None:
        """Left-padding counts, fixed by the first forward of a sequence (later masks only extend it). The one
        host synchronisation of a generation happens here."""
        self.pad = pad
        self.pad_list = [int(x) for x in pad.tolist()]
        self.has_pad = any(self.pad_list)

    def logical_lengths(self, total: int) -> list[int]:
        return [total - p for p in self.pad_list]

    # --- Lightning layers --------------------------------------------------------------------------------------
    def lightning_state(self, layer_idx: int) -> torch.Tensor | None:
        return self.states[layer_idx]

    def set_lightning_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.states[layer_idx] = state

    def window_store(self, layer_idx: int):
        """(keys, values, positions) of a Lightning layer's window branch, or None before its first tokens."""
        if self.window_keys[layer_idx] is None:
            return None
        return self.window_keys[layer_idx], self.window_values[layer_idx], self.window_pos[layer_idx]

    def update_window(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Add new keys and values (B, Hkv, T, D) at positions `pos` (B, T; negative: padding) to the store, which
        keeps each row's sinks and its last `window` positions. Returns what the new tokens' queries read: the keys,
        values and positions held before, followed by the new ones."""
        held = self.window_store(layer_idx)
        if held is not None:
            k, v, pos = (torch.cat([a, b], dim=d) for a, b, d in zip(held, (k, v, pos), (2, 2, 1)))
        B, H = k.shape[:2]
        size = self.sinks + self.window
        slot = window_slots(pos, self.window, self.sinks)  # size (dropped) for what leaves the store
        # keys may be wider than values: with lightning_sink_reach the layer stores [k, k_far] side by side
        keys, values = k.new_zeros(B, H, size + 1, k.shape[-1]), v.new_zeros(B, H, size + 1, v.shape[-1])
        keys.scatter_(2, slot[:, None, :, None].expand(B, H, -1, k.shape[-1]), k)
        values.scatter_(2, slot[:, None, :, None].expand(B, H, -1, v.shape[-1]), v)
        kept = pos.new_full((B, size + 1), -1).scatter_(1, slot, pos)
        self.window_keys[layer_idx], self.window_values[layer_idx] = keys[:, :, :size], values[:, :, :size]
        self.window_pos[layer_idx] = kept[:, :size]
        return k, v, pos

    # --- sparse layers -----------------------------------------------------------------------------------------
    def update_sparse(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Append new keys/values (B, Hkv, T, D); returns all keys, values and the compressed keys."""
        old_total = 0 if self.keys[layer_idx] is None else self.keys[layer_idx].shape[2]
        total = old_total + k.shape[2]
        self._kbuf[layer_idx] = _write(self._kbuf[layer_idx], old_total, k)
        self._vbuf[layer_idx] = _write(self._vbuf[layer_idx], old_total, v)
        keys = self.keys[layer_idx] = self._kbuf[layer_idx][:, :, :total]
        self.values[layer_idx] = self._vbuf[layer_idx][:, :, :total]
        self._append_compressed(layer_idx, keys, old_total, total)
        return keys, self.values[layer_idx], self.ckeys[layer_idx]

    def _append_compressed(self, layer_idx: int, keys, old_total, total) -> None:
        B, H, _, D = keys.shape
        old_len = [max(0, n) for n in self.logical_lengths(old_total)]
        have_all = [num_compressed(n, self.kernel, self.stride) for n in old_len]
        need_all = self.compressed_count(total)
        ck = self._grown(self.ckeys, self._cbuf, layer_idx, keys, max(need_all))
        for b in range(B):
            have, need = have_all[b], need_all[b]
            if need > have:
                start = self.pad_list[b] + have * self.stride
                stop = self.pad_list[b] + (need - 1) * self.stride + self.kernel
                ck[b, :, have:need] = compress_keys(keys[b : b + 1, :, start:stop], self.kernel, self.stride)[0]
        if not self.coarse:
            return
        # K2 window c starts at K1 key c * step: the K1 keys from have2 * step on give exactly the new windows
        have2_all, need2_all = [self._count2(n) for n in have_all], [self._count2(n) for n in need_all]
        ck2 = self._grown(self.ckeys2, self._c2buf, layer_idx, keys, max(need2_all))
        step = self.stride2 // self.stride
        for b in range(B):
            have2, need2 = have2_all[b], need2_all[b]
            if need2 > have2:
                part = ck[b : b + 1, :, have2 * step : need_all[b]]
                ck2[b, :, have2:need2] = coarse_compressed_keys(part, self.kernel, self.stride, self.kernel2,
                                                                self.stride2)[0]

    def _grown(self, views: list, bufs: list, layer_idx: int, like: torch.Tensor, want: int) -> torch.Tensor:
        """The float32 buffer bufs[layer_idx] with at least `want` filled-or-zero positions; views[layer_idx] = the
        view of its first `want` positions (returned)."""
        B, H, _, D = like.shape
        old_want = 0 if views[layer_idx] is None else views[layer_idx].shape[2]
        if views[layer_idx] is None or want > old_want:
            grow = like.new_zeros(B, H, want - old_want, D, dtype=torch.float32)
            bufs[layer_idx] = _write(bufs[layer_idx], old_want, grow)
        views[layer_idx] = bufs[layer_idx][:, :, :max(want, old_want)]
        return views[layer_idx]

    def _count2(self, nc: int) -> int:
        return num_coarse(nc, self.kernel, self.stride, self.kernel2, self.stride2)

    def compressed_count(self, total: int) -> list[int]:
        return [num_compressed(n, self.kernel, self.stride) for n in self.logical_lengths(total)]

    def coarse_keys(self, layer_idx: int) -> torch.Tensor | None:
        """The coarse keys (B, Hkv, N2, D) of a sparse layer (None without the coarse normaliser)."""
        return self.ckeys2[layer_idx] if self.coarse else None

    def coarse_count(self, total: int) -> list[int]:
        return [self._count2(n) for n in self.compressed_count(total)]

    # --- batch surgery used by generation utilities ------------------------------------------------------------
    def _map(self, fn) -> None:
        """Apply a batch-dimension operation to everything held; buffers shrink to their filled part."""
        for store in (self.states, self.keys, self.values, self.ckeys, self.ckeys2, self.window_keys,
                      self.window_values, self.window_pos):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = fn(t)
        self._kbuf, self._vbuf, self._cbuf = list(self.keys), list(self.values), list(self.ckeys)
        self._c2buf = list(self.ckeys2)
        if self.pad is not None:
            self.set_padding(fn(self.pad))

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
        """Bytes held (buffers with their headroom), for memory reports."""
        total = 0
        for store in (self.states, self._kbuf, self._vbuf, self._cbuf, self._c2buf, self.window_keys,
                      self.window_values, self.window_pos):
            total += sum(t.numel() * t.element_size() for t in store if t is not None)
        return total


__all__ = ["HybridCache"]
