"""Prefill and decode speed and peak memory over context lengths, for a hybrid and its source side by side.

Per model and context length L (batch 1 prefill, in chunks):
- time to first token: the whole chunked prefill of L tokens plus the last position's logits;
- peak GPU memory of that prefill (weights included);
- decode tokens/s at each batch size: the prefilled cache is copied to the batch (batch_repeat_interleave), 17
  untimed warm-up steps run, then `decode_steps` tokens are decoded one step at a time, each step timed on its own
  (device synchronised); tokens/s = batch / the median step time (robust to the odd slow step: allocator growth, a
  host hiccup). The steps go through the model's forward, so a hybrid on CUDA decodes through its CUDA graphs
  (`config.decode_cuda_graphs`; recorded during the warm-up, dropped after each batch).
Running out of memory is a result ("oom"), not a crash. Each model has a time cap: a length whose predicted time
(extrapolated from the lengths before it) would pass the cap is recorded as "skipped".

Weightless shapes (`SHAPES`, e.g. "llama3-8b") build a random-init model of that shape and its 1:3 hybrid directly on
the device, one at a time, so speed at 8B scale can be measured without the checkpoint.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..common import format_length
from .prefill import DEFAULT_CHUNK, forward_chunk, prefill, use_chunked_sdpa

DECODE_WARMUP_STEPS = 17
WARMUP_CAP = 1 << 18  # the longest default warm-up prefill (256K tokens)

# Shapes of Llama-family models (transformers LlamaConfig fields).
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 20,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=1 << 20,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=1 << 20,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def parse_length(text: str | int) -> int:
    """'128K' -> 131072, '1M' -> 1048576, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    mult = 1
    if s.endswith("K"):
        mult, s = 1024, s[:-1]
    elif s.endswith("M"):
        mult, s = 1 << 20, s[:-1]
    try:
        value = int(float(s) * mult)
    except ValueError:
        raise ValueError(f"context lengths look like 4096, 128K or 1M, got {text!r}") from None
    if value < 1:
        raise ValueError(f"context lengths must be positive, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Models of a shape, built one at a time
# ---------------------------------------------------------------------------------------------------------------------
def shape_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"--shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)


def random_model(config, dtype: torch.dtype, device: torch.device):
    """A random-init model of `config` (a LlamaConfig or HybridConfig) made directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    from ..arch.configuration_hybridize import HybridConfig
    from ..arch.modeling_hybridize import HybridForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        if isinstance(config, HybridConfig):
            model = HybridForCausalLM._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def shape_builders(shape: str, ratio: str, dtype: torch.dtype, device: torch.device,
                   variants: dict[str, dict] | None = None) -> dict[str, Callable]:
    """{name: () -> model} for the dense source of a shape and its hybrid(s). `variants` maps a name suffix to
    HybridConfig overrides (e.g. {"block": {"sparse_selection": "block"}}); default: one hybrid, default config."""
    from ..convert.build import hybrid_config_from_source
    from ..select.placement import layer_types_for

    src_config = shape_config(shape)
    types = layer_types_for(src_config.num_hidden_layers, ratio)
    builders: dict[str, Callable] = {}
    for suffix, overrides in (variants or {"": {}}).items():
        config = hybrid_config_from_source(src_config, types, **overrides)
        name = f"hybrid {ratio}" + (f" {suffix}" if suffix else "")
        builders[name] = lambda c=config: random_model(c, dtype, device)
    builders[f"{shape} (dense)"] = lambda: random_model(src_config, dtype, device)
    return builders


def selection_variant(selection: str | None, normalizer: str | None) -> dict[str, dict] | None:
    """The `variants` of shape_builders for a --sparse-selection / --normalizer choice (None: the config defaults)."""
    if selection is None and normalizer is None:
        return None
    overrides: dict = {}
    if selection is not None:
        overrides["sparse_selection"] = selection
    if normalizer is not None:
        overrides["sparse_coarse_normalizer"] = normalizer == "coarse"
    label = "+".join(x for x in (selection, normalizer and f"{normalizer} normaliser") if x)
    return {f"({label} selection)": overrides}


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class LengthResult:
    length: int
    status: str  # "ok", "oom", "skipped", "error"
    ttft_s: float | None = None
    peak_gib: float | None = None
    cache_gib: float | None = None
    decode_tok_s: dict[int, float | str] = field(default_factory=dict)  # batch -> tokens/s, "oom" or "skipped"
    note: str = ""


@dataclass
class ModelBench:
    name: str
    kind: str  # "hybrid" or "dense"
    params: int
    results: list[LengthResult] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cache_bytes_estimate(config, length: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes of the KV cache (softmax-attention layers) and Lightning states for `batch` sequences of `length`."""
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "model_type", None) == "hybridize":
        n_attn = sum(t == "full_attention" for t in layer_types)
        n_lin = len(layer_types) - n_attn
    else:
        n_attn, n_lin = config.num_hidden_layers, 0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * n_attn * config.num_key_value_heads * head_dim * length * dtype_bytes
    state = n_lin * config.num_attention_heads * head_dim * head_dim * 4
    return batch * (kv + state)


def cache_gib(cache) -> float | None:
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes() / 2**30
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / 2**30


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    # cuBLAS reports a failed workspace allocation as its own status, not as "out of memory"
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in ("out of memory", "alloc_failed"))


def cache_fits(model, length: int, device: torch.device, chunk_size: int = DEFAULT_CHUNK) -> tuple[bool, str]:
    """Whether the cache of one sequence of `length` plus one chunk's MLP activations can be allocated at all
    (a real allocation, freed at once). A model that fails this cannot prefill `length` tokens."""
    if device.type != "cuda":
        return True, ""
    cfg = model.config
    est = cache_bytes_estimate(cfg, length)
    work = min(chunk_size, length) * (3 * cfg.intermediate_size + 2 * cfg.hidden_size) * 2
    try:
        probe = torch.empty(est + work, dtype=torch.uint8, device=device)
        del probe
        return True, ""
    except torch.OutOfMemoryError:
        _free(device)
        return False, (f"its cache ({est / 2**30:.1f} GiB) and one chunk's MLP activations ({work / 2**30:.1f} GiB) "
                       f"cannot be allocated beside the weights")


def largest_fitting_length(model, device: torch.device, chunk_size: int = DEFAULT_CHUNK, high: int = 1 << 26) -> int:
    """The longest context (a multiple of `chunk_size`, at most `high`) whose cache and one chunk's activations pass
    `cache_fits` now, by bisection: an allocation probe, not a prefill (0 when even one chunk does not fit). Lengths
    whose bytes exceed the device's free memory fail without an allocation attempt."""
    free = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's own
    cfg = model.config

    def fits(length: int) -> bool:
        need = cache_bytes_estimate(cfg, length) + chunk_size * (3 * cfg.intermediate_size + 2 * cfg.hidden_size) * 2
        return (free is None or need <= free) and cache_fits(model, length, device, chunk_size)[0]

    lo, hi = 0, high // chunk_size  # in chunks: lo fits (0 trivially), everything above hi is out of range
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * chunk_size):
            lo = mid
        else:
            hi = mid - 1
    return lo * chunk_size


def widen_batch(cache, logits: torch.Tensor, done_batch: int, batch: int) -> torch.Tensor:
    """Grow `cache` in place, and return `logits`, from `done_batch` rows of one sequence to `batch` rows. A cache that
    can drop rows is cut to one row first, so a batch needs memory for itself and one row, not for itself and the
    batch before it; any other cache repeats the rows it has (`batch` must be a multiple of `done_batch`)."""
    if done_batch > 1 and hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(torch.zeros(1, dtype=torch.long, device=logits.device))
        logits, done_batch = logits[:1], 1
    cache.batch_repeat_interleave(batch // done_batch)
    return logits.repeat_interleave(batch // done_batch, dim=0)


def bench_length(model, length: int, *, device, chunk_size: int, decode_batches: list[int], decode_steps: int,
                 vocab: int, seed: int = 0, decode_warmup_steps: int = DECODE_WARMUP_STEPS) -> LengthResult:
    """One context length: prefill (batch 1), then decode at each batch size (increasing; the first that runs out of
    memory ends the list, so the last batch that ran is the largest that fits among those asked). OOM becomes a
    result. Each batch is made from one row of the cache (all rows are the same sequence), so a batch needs memory
    for itself and one row, not for itself and the batch before it."""
    res = LengthResult(length, "ok")
    fits, why = cache_fits(model, length, device, chunk_size)
    if not fits:
        res.status, res.note = "oom", why
        return res
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, vocab, (1, length), generator=g).to(device)
    cache = logits = None
    oom = False
    try:
        _sync(device)
        t0 = time.perf_counter()
        state = prefill(model, ids, chunk_size)
        _sync(device)
        res.ttft_s = time.perf_counter() - t0
        cache, logits = state.cache, state.logits
        del state
        res.cache_gib = cache_gib(cache)
    except Exception as e:  # noqa: BLE001 - only OOM is a result; anything else is re-raised below
        if not _is_oom(e):
            raise
        oom = True
    if device.type == "cuda":
        res.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if oom:
        cache = logits = None
        _free(device)
        res.status, res.note = "oom", "out of memory during prefill"
        return res
    done_batch = 1
    for b in sorted(decode_batches):
        if b % done_batch and not hasattr(cache, "batch_select_indices"):
            res.decode_tok_s[b] = "skipped"
            continue
        try:
            if b > done_batch:
                logits, done_batch = widen_batch(cache, logits, done_batch, b), b
            nxt = logits.argmax(-1)[:, None]
            # Warm-up steps: Triton compiles a kernel variant per batch size and per divisibility of the growing
            # cache length by 16 (its integer specialisation); 17 steps meet every variant before the timed steps.
            for _ in range(decode_warmup_steps):
                logits, cache = forward_chunk(model, nxt, cache)
                logits = logits[:, -1]
            step_s = []
            for _ in range(decode_steps):
                _sync(device)
                t0 = time.perf_counter()
                logits, cache = forward_chunk(model, logits.argmax(-1)[:, None], cache)
                logits = logits[:, -1]
                _sync(device)
                step_s.append(time.perf_counter() - t0)
            res.decode_tok_s[b] = b / statistics.median(step_s)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            oom = True
        _drop_decode_graphs(model)  # the next batch must fit without this one's graphs and state buffers
        if oom:
            for rest in sorted(decode_batches):
                if rest >= b:
                    res.decode_tok_s[rest] = "oom"
            break
    cache = logits = None
    _free(device)
    return res


def _drop_decode_graphs(model) -> None:
    """Free the hybrid's recorded decode graphs and the Lightning-state buffers their runners hold (one set per batch
    size decoded, kept for the next generation): the memory a batch or a length needs must not include them."""
    graphs = getattr(model, "decode_graphs", None)
    if graphs is not None:
        graphs.reset()


@torch.no_grad()
def bench_model(
    name: str,
    model,
    lengths: list[int],
    *,
    chunk_size: int = DEFAULT_CHUNK,
    decode_batches: tuple[int, ...] = (1,),
    decode_steps: int = 16,
    time_cap_s: float | None = None,
    warmup_length: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_result: Callable[[str, LengthResult], None] | None = None,
    decode_at: dict[int, tuple[int, ...]] | None = None,
    decode_warmup_steps: int = DECODE_WARMUP_STEPS,
    cap_from: float | None = None,
) -> ModelBench:
    """Benchmark one model over `lengths` (increasing). Stops growing at the first OOM. A warm-up prefill of
    `warmup_length` tokens (0: none) runs first and is not recorded. Default: for a hybrid, the longest length (at
    most WARMUP_CAP): its chunked prefill meets every Triton kernel variant (the sparse selection is specialised per
    power of two of the key-block count) and every prefill shape the fused pieces compile for, so that no
    compilation falls inside a timed prefill; for a dense model, the shortest length. `decode_at` maps a length to
    the decode batches run there instead of `decode_batches`; `decode_warmup_steps` untimed steps precede the timed
    ones at each batch size. `time_cap_s` counts from `cap_from` (a `time.perf_counter()` value, e.g. taken before
    the model was built) or, without it, from the end of the warm-up."""
    from .loading import model_kind

    device = next(model.parameters()).device
    use_chunked_sdpa(model)  # dense models: flash/efficient attention for chunks after a cache
    out = ModelBench(name, model_kind(model), sum(p.numel() for p in model.parameters()))
    vocab = model.config.vocab_size
    if warmup_length is None:  # first calls pay for kernel compilation and allocator growth
        warmup_length = min(max(lengths), WARMUP_CAP) if out.kind == "hybrid" else min(lengths)
    if warmup_length:
        t0 = time.perf_counter()
        bench_length(model, min(warmup_length, max(lengths)), device=device, chunk_size=chunk_size,
                     decode_batches=[1], decode_steps=2, vocab=vocab)
        if log is not None:
            log(f"{name}: warm-up at {format_length(min(warmup_length, max(lengths)))} (untimed, compilation "
                f"included) took {time.perf_counter() - t0:.1f} s")
    start = time.perf_counter() if cap_from is None else cap_from
    measured: list[tuple[int, float]] = []  # (length, prefill seconds)
    decoded: tuple[int, float] | None = None  # (length, seconds per decode batch there, warm-up steps included)
    stopped = ""

    def record(r: LengthResult) -> None:
        out.results.append(r)
        if on_result is not None:
            on_result(name, r)
        if log is not None:
            log(f"{name} {format_length(r.length)}: {describe(r)}")

    for L in sorted(lengths):
        batches = (decode_at or {}).get(L, decode_batches)
        reason = stopped
        if not reason and time_cap_s is not None and measured:
            # the prefill extrapolated; decoding as at the last length that decoded, per batch, scaled by the length
            predicted = _predict(measured, L)
            if decoded is not None and batches:
                predicted += decoded[1] * len(batches) * L / decoded[0]
            if time.perf_counter() - start + predicted > time_cap_s:
                reason = f"predicted {predicted:.0f} s passes the time cap"
        if reason:
            fits, why = cache_fits(model, L, device, chunk_size)  # cheap, and an OOM is still worth recording
            record(LengthResult(L, "skipped", note=reason) if fits else LengthResult(L, "oom", note=why))
            continue
        t_len = time.perf_counter()
        r = bench_length(model, L, device=device, chunk_size=chunk_size, decode_batches=list(batches),
                         decode_steps=decode_steps, vocab=vocab, decode_warmup_steps=decode_warmup_steps)
        record(r)
        if r.status == "oom":
            stopped = "a shorter context already ran out of memory"
        elif r.ttft_s is not None:
            measured.append((L, r.ttft_s))
            if r.decode_tok_s:
                decoded = (L, max(time.perf_counter() - t_len - r.ttft_s, 0.0) / len(r.decode_tok_s))
    return out


def _predict(measured: list[tuple[int, float]], length: int) -> float:
    """Time at `length` extrapolated from the last two measurements (power law, exponent clamped to [1, 2])."""
    L1, t1 = measured[-1]
    p = 2.0
    if len(measured) >= 2:
        L0, t0 = measured[-2]
        if t0 > 0 and t1 > 0 and L1 > L0:
            p = min(2.0, max(1.0, math.log(t1 / t0) / math.log(L1 / L0)))
    return t1 * (length / L1) ** p


def describe(r: LengthResult) -> str:
    if r.status != "ok":
        return f"{r.status} {r.note}".strip()
    dec = ", ".join(f"B={b}: {v:.1f} tok/s" if isinstance(v, float) else f"B={b}: {v}" for b, v in r.decode_tok_s.items())
    peak = f", peak {r.peak_gib:.1f} GiB" if r.peak_gib is not None else ""
    return f"TTFT {r.ttft_s:.3f} s{peak}; decode {dec}"


@dataclass
class BenchReport:
    device: str
    dtype: str
    chunk_size: int
    decode_steps: int
    decode_batches: list[int]
    lengths: list[int]
    models: list[ModelBench]
    command: str = ""
    date: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def run_bench(
    builders: dict[str, Callable],
    lengths: list[int],
    *,
    device: torch.device,
    dtype: str,
    chunk_size: int = DEFAULT_CHUNK,
    decode_batches: tuple[int, ...] = (1,),
    decode_steps: int = 16,
    time_cap_s: float | None = None,
    warmup_length: int | None = None,
    command: str = "",
    log: Callable[[str], None] | None = print,
) -> BenchReport:
    """Build each model in turn (only one is alive at a time), benchmark it, and free it."""
    models = []
    for name, build in builders.items():
        model = build()
        models.append(bench_model(name, model, lengths, chunk_size=chunk_size, decode_batches=decode_batches,
                                  decode_steps=decode_steps, time_cap_s=time_cap_s, warmup_length=warmup_length,
                                  log=log))
        del model
        _free(device)
    return BenchReport(device_name(device), dtype, chunk_size, decode_steps, sorted(decode_batches), sorted(lengths),
                       models, command, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


__all__ = [
    "SHAPES", "BenchReport", "LengthResult", "ModelBench", "bench_length", "bench_model", "cache_bytes_estimate",
    "largest_fitting_length", "parse_length", "random_model", "run_bench", "shape_builders", "shape_config",
    "widen_batch",
]
