"""Chunked prefill and a small generation loop that works for the hybrid and for dense transformers models.

A long prompt goes through the model `chunk_size` tokens at a time, each chunk continuing from the cache the previous
one left (the hybrid's HybridCache, a dense model's DynamicCache, or whatever cache a model returns), so no activation
of the full prompt length (the MLP's (T, intermediate) tensors above all) is ever materialised. Only the logits of the
positions asked for are computed.

transformers renamed the cache argument and output field from `past_key_values` to `cache` during 5.x: the helpers
here look at the model's forward signature and at the output object, so the same code runs on 5.17 and the newest 5.x.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

DEFAULT_CHUNK = 16384
LOWER_RIGHT_SDPA = "hybridize_sdpa_chunked"


def cache_kwarg(model) -> str:
    """The name under which `model.forward` takes its cache."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    return "past_key_values"


def output_cache(out) -> Any:
    """The cache a forward returned, whatever the output field is called."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return cache


def cache_length(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def forward_chunk(model, input_ids: torch.Tensor, cache=None, *, logits_to_keep: int = 1, attention_mask=None):
    """One forward of `input_ids` (B, T) after `cache`; returns (logits of the last `logits_to_keep` positions or all
    positions when 0, the cache)."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": logits_to_keep}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = model(input_ids=input_ids, **kwargs)
    new_cache = output_cache(out)
    if new_cache is None:
        raise ValueError(f"{type(model).__name__} returned no cache: it cannot be prefilled in chunks")
    return out.logits, new_cache


def iter_chunks(length: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for start in range(0, length, chunk_size):
        yield start, min(start + chunk_size, length)


@dataclass
class Prefilled:
    logits: torch.Tensor  # (B, vocab) logits of the last prompt token, or (B, T, vocab) with all_logits
    cache: Any


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    cache=None,
    *,
    on_chunk: Callable[[torch.Tensor, int, int], None] | None = None,
    progress: bool = False,
) -> Prefilled:
    """Feed `input_ids` (B, T) through `model` in chunks; returns the last position's logits and the filled cache.

    `on_chunk(logits, start, stop)`, when given, receives every position's logits of each chunk (for perplexity);
    without it only the last position's logits are computed.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length > 0, got {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    chunks = list(iter_chunks(T, chunk_size))
    bar = None
    if progress and len(chunks) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, unit="tok", desc="prefill", leave=False)
    logits = None
    for start, stop in chunks:
        logits, cache = forward_chunk(model, input_ids[:, start:stop], cache, logits_to_keep=0 if on_chunk else 1)
        if on_chunk is not None:
            on_chunk(logits, start, stop)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return Prefilled(logits[:, -1], cache)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Chunked prefill, then one token at a time from the cache. Greedy when temperature is 0.
    Returns the new tokens (B, <= max_new_tokens); a sequence that produced EOS is padded with EOS."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    state = prefill(model, input_ids, chunk_size)
    logits, cache = state.logits, state.cache
    out = []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = pick_token(logits, temperature, generator)
        if eos:
            fill = next(iter(eos))
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            done |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
        out.append(nxt)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        logits, cache = forward_chunk(model, nxt[:, None], cache)
        logits = logits[:, -1]
    return torch.stack(out, dim=1)


def pick_token(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Dense models: causal attention for a chunk of queries after a cache, without a materialised mask
# ---------------------------------------------------------------------------------------------------------------------
def _chunked_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query (B, H, Tq, D) at the END of key/value (B, Hkv, Tk, D), causal aligned to
    the lower right, so PyTorch picks its flash/efficient kernels instead of a (Tq, Tk) mask."""
    from torch.nn.attention.bias import causal_lower_right

    if attention_mask is not None:
        raise ValueError("the chunked SDPA attention takes no padding mask: give unpadded batches")
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    Tq, Tk = query.shape[2], key.shape[2]
    if Tq == Tk:
        o = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        o = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=causal_lower_right(Tq, Tk), scale=scaling
        )
    return o.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def use_chunked_sdpa(model) -> bool:
    """Switch a dense transformers model (Llama family) to `_chunked_sdpa`. Returns False for models that do not use
    transformers' attention interface (the hybrid), which are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if getattr(model.config, "model_type", None) == "hybridize" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(LOWER_RIGHT_SDPA, _chunked_sdpa)
    AttentionMaskInterface.register(LOWER_RIGHT_SDPA, _no_mask)
    model.set_attn_implementation(LOWER_RIGHT_SDPA)
    return True


__all__ = [
    "DEFAULT_CHUNK", "Prefilled", "cache_kwarg", "cache_length", "forward_chunk", "generate", "iter_chunks",
    "output_cache", "pick_token", "prefill", "use_chunked_sdpa",
]
