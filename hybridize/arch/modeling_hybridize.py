"""The hybrid model: Llama-style blocks whose token mixer is Lightning linear attention or InfLLM-V2 sparse attention.

Copied verbatim into every exported model folder together with configuration, cache and kernel files, so a model
saved by hybridize loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` anywhere.
Imports only torch, transformers and the sibling files.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_hybridize import HybridCache
from .configuration_hybridize import LIGHTNING, HybridConfig
from .decode_graphs import DecodeGraphs, DecodeIO, DecodePiece, PieceOutputs, lightning_step_in_place
from .ops import (lightning_attention, norm_rope, output_norm_gate, sparse_attention, window_attention,
                  window_attention_at)

try:
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover - older transformers
    _LayerBase = nn.Module


# ---------------------------------------------------------------------------------------------------------------------
# Fused elementwise pieces (CUDA inference)
# ---------------------------------------------------------------------------------------------------------------------
def _rms_norm_math(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, statistics in float32, the weight applied in the input's dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _add_rms_norm_math(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm of its result, (x + delta, norm(x + delta))."""
    s = x + delta
    return s, _rms_norm_math(s, weight, eps)


def _silu_mul_math(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def _sigmoid_mul_math(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(gate) * x


class FusedElementwise:
    """torch.compile'd versions of the small elementwise pieces above, for inference on CUDA.

    In eager PyTorch each of them is 5-15 passes over its tensor (float32 copies, squares, means, the RoPE halves and
    their concatenation); compiled, each is one read and one write. They are used only where nothing can go wrong and
    the passes cost time: CUDA tensors of at least `min_elements` (16M: long-prompt prefill chunks, e.g. 4096 tokens
    of a 4096-wide model; short prompts and decode steps stay eager and never wait for a compilation, as do training
    and CPU), no autograd, not inside torch.compile or a CUDA graph capture, torch.compile available. One per model,
    switched by the model's `config.fused_elementwise` (default true; also at run time). A compilation error turns
    them off for this model with a warning (the eager code gives the same values); a piece that met more input shapes
    than torch.compile's recompile limit runs eagerly for the new shapes only.
    """

    min_elements = 1 << 24

    def __init__(self, config) -> None:
        self.config = config
        self._failed = False
        self._compiled: dict[str, object] = {}
        self._at_limit: set[str] = set()

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.config, "fused_elementwise", True)) and not self._failed

    def __deepcopy__(self, memo):  # a copied model shares the copied config and compiles afresh
        return FusedElementwise(copy.deepcopy(self.config, memo))

    def __getstate__(self):  # a pickled model (torch.save, multiprocessing) leaves the compiled functions behind
        return {"config": self.config, "_failed": self._failed}

    def __setstate__(self, state):
        self.__init__(state["config"])
        self._failed = state["_failed"]

    def usable(self, x: torch.Tensor) -> bool:
        if not (self.enabled and x.is_cuda and x.numel() >= self.min_elements and not torch.is_grad_enabled()
                and hasattr(torch, "compile")):
            return False
        compiler = getattr(torch, "compiler", None)
        if compiler is not None and compiler.is_compiling():
            return False
        return not torch.cuda.is_current_stream_capturing()

    def __call__(self, fn, *args):
        name = fn.__name__
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = self._compiled[name] = torch.compile(fn, fullgraph=True, options=_compile_options())
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - out of memory is re-raised, anything else falls back to eager
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                raise
            if "RecompileLimit" in type(e).__name__ or "CacheLimit" in type(e).__name__:
                if name not in self._at_limit:
                    self._at_limit.add(name)
                    warnings.warn(f"hybridize: {name} met more input shapes than torch.compile's recompile limit; "
                                  "plain PyTorch for new shapes", RuntimeWarning, stacklevel=2)
                return fn(*args)
            warnings.warn(f"hybridize: torch.compile of {name} failed ({type(e).__name__}: {str(e)[:200]}); "
                          "running plain PyTorch from now on", RuntimeWarning, stacklevel=2)
            self._failed = True
            return fn(*args)


def _fused_or_eager(fused: FusedElementwise | None, fn, *args):
    """fn(*args): the model's compiled version where it is usable for the first argument, else the plain code."""
    if fused is not None and fused.usable(args[0]):
        return fused(fn, *args)
    return fn(*args)


def _compile_options() -> dict | None:
    """Inductor rounds to bfloat16 wherever the eager code does (`.to(dtype)`), where this torch knows how: the fused
    pieces then give the eager results bit for bit, up to the order of a row's sum of squares."""
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # noqa: BLE001 - no inductor: torch.compile's own error decides
        return None
    return {"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts") else None


# ---------------------------------------------------------------------------------------------------------------------
# Small parts
# ---------------------------------------------------------------------------------------------------------------------
class HybridRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6, fused: FusedElementwise | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused.usable(x):
            return self.fused(_rms_norm_math, x, self.weight, self.variance_epsilon)
        if x.is_cuda and x.dtype == self.weight.dtype:
            # the output norm's Triton kernel without a gate: one launch forward and two backward, where the eager
            # composition launches about six and ten (61 norms in a SmolLM2-shaped training step, which the host
            # launching kernels bounds)
            return output_norm_gate(x, None, self.weight, self.variance_epsilon)
        return _rms_norm_math(x, self.weight, self.variance_epsilon)


class HybridRotaryEmbedding(nn.Module):
    """RoPE tables from the source model's `rope_parameters` (default, llama3, linear, yarn, ... via transformers)."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "default":
            base = config.rope_parameters["rope_theta"]
            dim = config.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor):
        """position_ids (B, T) -> cos, sin (B, T, D), float32."""
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, D). Rotation in float32, result in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class HybridMLP(nn.Module):
    def __init__(self, config: HybridConfig, fused: FusedElementwise | None = None):
        super().__init__()
        self.fused = fused
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.silu = config.hidden_act == "silu"  # fused silu(gate) * up on CUDA inference

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.silu and self.fused is not None and self.fused.usable(gate):
            return self.down_proj(self.fused(_silu_mul_math, gate, up))
        return self.down_proj(self.act_fn(gate) * up)  # the activation module itself (its forward hooks run)


def lightning_log_decay(config: HybridConfig, layer_idx: int) -> torch.Tensor:
    """log g_h per head. SALA: g_h = exp(-m_h), m_h = 2^(-8(h+1)/H), the same in every layer.
    "layerwise" (TransNormer/MiniMax): slopes scaled by (1 - l/(L-1) + 1e-5), so deeper layers decay slower."""
    H = config.num_attention_heads
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)
    if config.lightning_decay == "layerwise":
        L = config.num_hidden_layers
        slopes = slopes * (1.0 - layer_idx / max(L - 1, 1) + 1e-5)
    return -slopes


@dataclass
class AttentionContext:
    """Per-forward facts every layer needs, computed once by the model."""

    position_ids: torch.Tensor  # (B, T) logical positions (padding excluded)
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    pad: torch.Tensor | None  # (B,) left-padding counts, None when there is none
    pad_mask: torch.Tensor | None  # (B, T) True at left-padding positions of this chunk
    cu_seqlens: torch.Tensor | None  # packed documents (B == 1)
    cache: HybridCache | None
    # Lightning layers update the cache's states in place (a decode graph's kernels were recorded on those buffers)
    lightning_in_place: bool = False
    # cu_seqlens on the CPU: the sparse layers build their row tables from it on the host, so one copy per forward
    # replaces a host synchronisation per sparse layer and kernel
    cu_seqlens_host: torch.Tensor | None = None
    # cos, sin (1, 2, D) at positions 0 and config.lightning_sink_reach: the window branch's far sink scoring
    far_rope: tuple[torch.Tensor, torch.Tensor] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Token mixers
# ---------------------------------------------------------------------------------------------------------------------
class LightningAttention(nn.Module):
    """Lightning linear attention (docs/design.md §3.1). Multi-head: K/V heads equal query heads."""

    def __init__(self, config: HybridConfig, layer_idx: int, fused: FusedElementwise | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.fused = fused
        self.num_heads = config.num_attention_heads
        # "source": K/V keep the source's heads, each shared by its group of query heads (expanded at run time)
        self.num_kv_heads = config.num_key_value_heads if config.lightning_kv_heads == "source" else self.num_heads
        self.head_dim = config.head_dim
        self.chunk_size = config.lightning_chunk_size
        self.output_gates = config.output_gates
        self.window = config.lightning_window
        hd = self.num_heads * self.head_dim
        kvd = self.num_kv_heads * self.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kvd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kvd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(hd, h, bias=config.o_bias)
        self.q_norm = HybridRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = HybridRMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_norm = HybridRMSNorm(hd, config.rms_norm_eps)
        if self.output_gates:
            self.z_proj = nn.Linear(h, hd, bias=False)
        self.config = config
        self._log_decay: dict[torch.device, torch.Tensor] = {}  # fixed, not learned: kept out of the state dict

    def log_decay(self, device) -> torch.Tensor:
        if device not in self._log_decay:
            self._log_decay[device] = lightning_log_decay(self.config, self.layer_idx).to(device)
        return self._log_decay[device]

    def _project(self, x: torch.Tensor):
        B, T, _ = x.shape
        q_raw = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k_raw = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q_raw, k_raw, v

    def _normed(self, q_raw, k_raw, v, ctx: AttentionContext):
        # per-head norm, RoPE, (B, H, T, D) in v's dtype (under autocast the fp32 norm weights would promote q, k to
        # fp32 while v stays in the autocast dtype): one fused kernel per tensor on CUDA, training included
        q = norm_rope(q_raw, self.q_norm.weight, self.q_norm.variance_epsilon, ctx.cos, ctx.sin, v.dtype)
        k = norm_rope(k_raw, self.k_norm.weight, self.k_norm.variance_epsilon, ctx.cos, ctx.sin, v.dtype)
        return q, k

    def window_only(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The window branch alone through o_proj: what a fresh conversion's layer outputs (its recurrent branch's
        output norm starts at zero), without the recurrence's cost (hybridize.select.window_search)."""
        B, T, _ = x.shape
        q_raw, k_raw, v = self._project(x)
        # _window reads the normed q, k only when the source had q/k norms
        q, k = self._normed(q_raw, k_raw, v, ctx) if self.config.qk_norm else (None, None)
        window = self._window(q, k, q_raw, k_raw, v, ctx)
        return self.o_proj(window.transpose(1, 2).reshape(B, T, -1).to(x.dtype))

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q_raw, k_raw, v = self._project(x)
        q, k = self._normed(q_raw, k_raw, v, ctx)
        window = self._window(q, k, q_raw, k_raw, v, ctx) if self.window else None
        group = self.num_heads // self.num_kv_heads
        kv = v
        if group > 1:  # one state per query head: K/V head j serves query heads j*group .. (j+1)*group - 1
            k, kv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if ctx.pad_mask is not None:  # left padding must not enter the state
            k = k.masked_fill(ctx.pad_mask[:, None, :, None], 0.0)
        cache = ctx.cache
        state = cache.lightning_state(self.layer_idx) if cache is not None else None
        if ctx.lightning_in_place:
            o = lightning_step_in_place(q, k, kv, self.log_decay(x.device), self.head_dim ** -0.5, state)
        else:
            o, new_state = lightning_attention(
                q, k, kv, self.log_decay(x.device), scale=self.head_dim ** -0.5, initial_state=state,
                output_final_state=cache is not None, chunk_size=self.chunk_size, cu_seqlens=ctx.cu_seqlens,
            )
            if cache is not None:
                cache.set_lightning_state(self.layer_idx, new_state)
        o = o.transpose(1, 2).reshape(B, T, -1)
        z = self.z_proj(x) if self.output_gates else None
        o = output_norm_gate(o, z, self.o_norm.weight, self.o_norm.variance_epsilon)  # fused on CUDA
        if window is not None:
            o = o + window.transpose(1, 2).reshape(B, T, -1).to(o.dtype)
        return self.o_proj(o)

    def _window(self, q, k, q_raw, k_raw, v, ctx: AttentionContext) -> torch.Tensor:
        """The softmax branch (config.lightning_window): the source's attention over each sequence's sinks and its
        last `window` tokens, (B, H, T, D). The source's queries and keys: its q/k norm when it had one (then the
        recurrent branch's q, k are exactly those), else the projections with RoPE alone."""
        if not self.config.qk_norm:
            q = apply_rope(q_raw.transpose(1, 2), ctx.cos, ctx.sin).to(v.dtype)
            k = apply_rope(k_raw.transpose(1, 2), ctx.cos, ctx.sin).to(v.dtype)
        w, sinks, scale = self.window, self.config.lightning_sinks, self.head_dim ** -0.5
        cache = ctx.cache
        held = cache.window_store(self.layer_idx) if cache is not None else None
        T, D = q.shape[2], self.head_dim
        # far sink scoring where some query may lie beyond the reach; with a cache, k_far always (its store keeps
        # [k, k_far] side by side, so that later tokens find their sinks' k_far)
        reach = self.config.lightning_sink_reach if ctx.far_rope is not None else 0
        far_needed = bool(reach) and (cache.seq_len if cache is not None else 0) + T - 1 > reach
        q_far = self._rotated_at(q_raw, self.q_norm, ctx.far_rope, 1, v) if far_needed else None
        keep_far = bool(reach) and cache is not None
        k_far = self._rotated_at(k_raw, self.k_norm, ctx.far_rope, 0, v) if far_needed or keep_far else None
        stored = torch.cat([k, k_far], dim=-1) if keep_far else k
        if held is None:  # no earlier tokens: the blocked form over the whole input
            starts = ctx.pad if ctx.cu_seqlens is None else None
            out = window_attention(q, k, v, w, sinks, scale, cu_seqlens=ctx.cu_seqlens, starts=starts,
                                   far=(reach, q_far, k_far) if far_needed else None)
            if cache is not None:
                cache.update_window(self.layer_idx, stored, v, self._positions(ctx))
            return out
        # after earlier tokens: pieces of at most `window` new tokens against the store, the store updated after each
        pos = self._positions(ctx)
        outs = []
        for a in range(0, T, w):
            b = min(T, a + w)
            keys, values, key_pos = cache.update_window(self.layer_idx, stored[:, :, a:b], v[:, :, a:b], pos[:, a:b])
            far = (reach, q_far[:, :, a:b], keys[..., D:]) if far_needed else None
            outs.append(window_attention_at(q[:, :, a:b], keys[..., :D], values, pos[:, a:b], key_pos, w, sinks,
                                            scale, far=far))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _rotated_at(self, raw, norm, far_rope, which: int, v) -> torch.Tensor:
        """`raw` (B, T, H, D) as the window branch takes it (its norm where the source had one), rotated at one
        position for every token: far_rope's position 0 (which=0) or config.lightning_sink_reach (which=1)."""
        B, T = raw.shape[:2]
        cos, sin = (t[:, which : which + 1].expand(1, T, -1).contiguous() for t in far_rope)
        if self.config.qk_norm:
            return norm_rope(raw, norm.weight, norm.variance_epsilon, cos, sin, v.dtype)
        return apply_rope(raw.transpose(1, 2), cos, sin).to(v.dtype)

    @staticmethod
    def _positions(ctx: AttentionContext) -> torch.Tensor:
        """Each row's own token positions (B, T), -1 at left padding."""
        pos = ctx.position_ids
        return pos.masked_fill(ctx.pad_mask, -1) if ctx.pad_mask is not None else pos


class SparseAttention(nn.Module):
    """The source's softmax attention (GQA kept) run as InfLLM-V2 sparse attention beyond `sparse_dense_len`.
    NoPE when `hype` is on; optional output gate."""

    def __init__(self, config: HybridConfig, layer_idx: int, fused: FusedElementwise | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.fused = fused
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.use_rope = not config.hype
        self.output_gates = config.output_gates
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = HybridRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = HybridRMSNorm(self.head_dim, config.rms_norm_eps)
        if self.output_gates:
            self.g_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)

    def sparse_options(self) -> dict:
        c = self.config
        coarse_kernel, coarse_stride = c.sparse_coarse_window
        return dict(
            scale=self.head_dim ** -0.5, block_size=c.sparse_block_size, kernel=c.sparse_compress_kernel,
            stride=c.sparse_compress_stride, topk=c.sparse_topk, init_blocks=c.sparse_init_blocks,
            local_blocks=c.sparse_local_blocks, dense_len=c.sparse_dense_len,
            selection=c.sparse_selection, select_tokens=c.sparse_select_tokens,
            # InfLLM-V2's coarse normaliser: keys pooled over 4x the window and 4x the stride
            coarse=c.sparse_coarse_normalizer, coarse_kernel=coarse_kernel, coarse_stride=coarse_stride,
        )

    # A decode step through CUDA graphs records `project` and `finish` and runs `attend_cached` (whose shapes grow
    # with the cache) eagerly between them; `forward` is the three in a row.
    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.project(x, ctx)
        return self.finish(x, self.attend_cached(q, k, v, ctx))

    def project(self, x: torch.Tensor, ctx: AttentionContext):
        """Queries (B, H, T, D), keys and values (B, Hkv, T, D) of x in the kernels' dtype: all before the cache."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        a = self.config.sparse_query_log_scale
        if a is not None:  # HALO's NoPE query scaling: q_t *= log(t + a) / log(a)
            factor = torch.log(ctx.position_ids.float().clamp(min=0) + a) / math.log(a)
            q = (q.float() * factor[:, None, :, None]).to(q.dtype)
        q, k = q.to(v.dtype), k.to(v.dtype)  # one dtype for the kernels, also under autocast
        return q, k, v

    def attend_cached(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        """The new keys and values appended to the cache (when there is one), then attention: (B, H, T, D)."""
        ckeys = ckeys2 = None
        if ctx.cache is not None:
            k, v, ckeys = ctx.cache.update_sparse(self.layer_idx, k, v)
            ckeys2 = ctx.cache.coarse_keys(self.layer_idx)
        return self._attend(q, k, v, ckeys, ckeys2, ctx)

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Output gate (it reads the layer's input x) and o_proj of the attention output o (B, H, T, D)."""
        B, _, T, _ = o.shape
        o = o.transpose(1, 2).reshape(B, T, -1)
        if self.output_gates:
            o = _fused_or_eager(self.fused, _sigmoid_mul_math, self.g_proj(x), o)
        return self.o_proj(o)

    def _attend(self, q, k, v, ckeys, ckeys2, ctx: AttentionContext) -> torch.Tensor:
        """`ckeys` / `ckeys2`: the cache's compressed and coarse keys (None: built from k inside the call)."""
        opts = self.sparse_options()
        Tq, Tk = q.shape[2], k.shape[2]
        if ctx.cu_seqlens is not None:  # packed documents: attention never crosses a boundary (one varlen call)
            return sparse_attention(q, k, v, None, cu_seqlens=ctx.cu_seqlens_host, **opts)
        if ctx.pad is None:
            # without a cache (training, one-pass prefill) the positions stay on the host: block selection reads the
            # first one there instead of waiting for the GPU; with a cache the kernels keep them on the device
            pos = torch.arange(Tk - Tq, Tk, device=q.device if ctx.cache is not None else "cpu")
            return sparse_attention(q, k, v, pos, ckeys, coarse_keys=ckeys2, **opts)
        # Left padding: attend on each sequence's own tokens so that blocks and compressed keys ignore padding.
        out = q.new_zeros(q.shape)
        counts = ctx.cache.compressed_count(Tk) if ckeys is not None else None
        counts2 = ctx.cache.coarse_count(Tk) if ckeys2 is not None else None
        pads = ctx.cache.pad_list if ctx.cache is not None else ctx.pad.tolist()
        for b, pad in enumerate(pads):
            first_q = max(0, pad - (Tk - Tq))  # padded queries (prefill only) produce zeros
            if first_q >= Tq:
                continue
            kb, vb = k[b : b + 1, :, pad:], v[b : b + 1, :, pad:]
            pos = torch.arange(Tk - Tq + first_q - pad, Tk - pad, device=q.device)
            cb = ckeys[b : b + 1, :, : counts[b]] if ckeys is not None else None
            c2b = ckeys2[b : b + 1, :, : counts2[b]] if ckeys2 is not None else None
            out[b : b + 1, :, first_q:] = sparse_attention(q[b : b + 1, :, first_q:], kb, vb, pos, cb,
                                                           coarse_keys=c2b, **opts)
        return out


class HybridDecoderLayer(_LayerBase):
    def __init__(self, config: HybridConfig, layer_idx: int, fused: FusedElementwise | None = None):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.fused = fused
        mixer = LightningAttention if self.layer_type == LIGHTNING else SparseAttention
        self.self_attn = mixer(config, layer_idx, fused)
        self.mlp = HybridMLP(config, fused)
        self.input_layernorm = HybridRMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.post_attention_layernorm = HybridRMSNorm(config.hidden_size, config.rms_norm_eps, fused)

    def forward(self, hidden_states: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.add_mlp(hidden_states, self.self_attn(self.input_layernorm(hidden_states), ctx))

    def add_mlp(self, hidden_states: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The token mixer's output `mixed` added to the residual stream, then the MLP block with its residual."""
        norm = self.post_attention_layernorm
        if self.fused is not None and self.fused.usable(mixed):  # residual add + norm in one pass
            hidden_states, normed = self.fused(_add_rms_norm_math, hidden_states, mixed, norm.weight,
                                               norm.variance_epsilon)
        else:  # the norm module itself (its forward hooks run)
            hidden_states = hidden_states + mixed
            normed = norm(hidden_states)
        return hidden_states + self.mlp(normed)

    # A sparse layer split around its cache update and attention (decode graphs: see SparseAttention.forward).
    def sparse_inputs(self, hidden_states: torch.Tensor, ctx: AttentionContext):
        """(normed input x, q, k, v) of a sparse layer."""
        x = self.input_layernorm(hidden_states)
        return (x, *self.self_attn.project(x, ctx))

    def sparse_outputs(self, hidden_states: torch.Tensor, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The layer's output from its attention output o and normed input x."""
        return self.add_mlp(hidden_states, self.self_attn.finish(x, o))


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # Lightning states cannot be rolled back (no assisted generation)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # the model builds its own HybridCache
        return False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, HybridRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, HybridRotaryEmbedding):
            fresh = HybridRotaryEmbedding(module.config)
            module.inv_freq.copy_(fresh.inv_freq)
            module.original_inv_freq.copy_(fresh.original_inv_freq)


def left_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-sequence count of leading zeros in a 2D mask; None when there are none.
    Right padding needs nothing (causal layers never look ahead); holes in the middle are refused."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    m = attention_mask.to(torch.int64)
    pad = (m.cumsum(-1) == 0).sum(-1)
    # After the leading zeros a row must be ones, then optionally zeros (right padding).
    ones = m.sum(-1)
    idx = torch.arange(m.shape[1], device=m.device).view(1, -1)
    expected = ((idx >= pad.view(-1, 1)) & (idx < (pad + ones).view(-1, 1))).to(torch.int64)
    if not torch.equal(expected, m):
        raise ValueError("attention_mask must be left- or right-padding only (zeros, then ones, then zeros)")
    return pad if bool(pad.any()) else None


# transformers renamed the outputs' cache field from `past_key_values` to `cache` during 5.x; use whichever exists.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
_BASE_CACHE_FIELD = ("cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {})
                     else "past_key_values")


def _model_output(hidden, cache, all_hidden) -> BaseModelOutputWithPast:
    return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=all_hidden, **{_BASE_CACHE_FIELD: cache})


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.fused = FusedElementwise(config)  # compiled elementwise pieces for CUDA inference, shared by the layers
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i, self.fused) for i in range(config.num_hidden_layers))
        self.norm = HybridRMSNorm(config.hidden_size, config.rms_norm_eps, self.fused)
        self.rotary_emb = HybridRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = HybridCache(self.config)
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0

        if cache is not None and cache.pad is not None:  # padding was fixed by the sequence's first forward:
            pad = cache.pad if cache.has_pad else None  # later masks only extend it (and no host sync per step)
        else:
            pad = left_padding(attention_mask)
            if cache is not None:  # the first chunk of a sequence fixes its left padding for good
                cache.set_padding(pad if pad is not None else torch.zeros(B, dtype=torch.long, device=inputs_embeds.device))
        chunk = self.config.prefill_chunk_size
        if cache is not None and chunk and T > chunk and not self.training and cu_seqlens is None \
                and not output_hidden_states:
            # Long prompts are prefilled in chunks through the cache: no full-length MLP activation ever exists.
            hidden = []
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                out = self(
                    inputs_embeds=inputs_embeds[:, s:e],
                    attention_mask=None if attention_mask is None else attention_mask[:, : past + e],
                    position_ids=None if position_ids is None else position_ids[:, s:e],
                    cache=cache, use_cache=True,
                )
                hidden.append(out.last_hidden_state)
            return _model_output(torch.cat(hidden, dim=1), cache, None)
        pad_mask = None
        if pad is not None:
            col = torch.arange(past, past + T, device=inputs_embeds.device).view(1, -1)
            pad_mask = col < pad.view(-1, 1)
        if position_ids is None:
            col = torch.arange(past, past + T, device=inputs_embeds.device).view(1, -1)
            position_ids = (col - pad.view(-1, 1)).clamp(min=0) if pad is not None else col.expand(B, -1)
        cos, sin = self.rotary_emb(position_ids)
        host = None
        if cu_seqlens is not None:
            host = cu_seqlens.detach().to("cpu", torch.int64)
            # a caller that has the offsets on the host passes them so: copied once, without waiting for the GPU
            cu_seqlens = cu_seqlens.to(inputs_embeds.device, non_blocking=True)
        ctx = AttentionContext(position_ids, cos, sin, pad, pad_mask, cu_seqlens, cache, cu_seqlens_host=host)
        reach = self.config.lightning_sink_reach if self.config.lightning_window else 0
        if reach:
            ctx.far_rope = self.rotary_emb(torch.tensor([[0, reach]], device=inputs_embeds.device))

        hidden = inputs_embeds
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, ctx)
            if all_hidden is not None:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden[-1] = hidden
        if cache is not None:
            cache.seq_len += T
        return _model_output(hidden, cache, tuple(all_hidden) if all_hidden is not None else None)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def decode_graphs(self) -> DecodeGraphs:
        """This model's CUDA-graph decode steps (decode_graphs.py), created at first use: which path steps took
        (`paths`, `refusals`), `reset()` to free the recorded graphs and their buffers."""
        graphs = self.__dict__.get("_decode_graphs")
        if graphs is None:
            graphs = self._decode_graphs = DecodeGraphs()
        return graphs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        cu_seqlens: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        step_cache = cache if cache is not None else past_key_values
        unusual = _unusual_for_graphs(input_ids, inputs_embeds, position_ids, labels, output_hidden_states, cu_seqlens,
                                      self.config.use_cache if use_cache is None else use_cache, logits_to_keep)
        logits = self.decode_graphs.step(self, input_ids, step_cache, unusual)
        if logits is not None:  # a decode step through the graphs (decode_graphs.py): same logits, cache advanced
            return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: step_cache})
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, cu_seqlens=cu_seqlens, cache=cache,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{_CACHE_FIELD: getattr(out, _BASE_CACHE_FIELD)})

    # --- the pieces of a decode step (decode_graphs.py records them as CUDA graphs and runs the attention between) ---
    def decode_piece(self, piece: DecodePiece, io: DecodeIO, cache: HybridCache) -> None:
        """One fixed-shape piece of a decode step: reads the runner's buffers in `io` and the previous piece's outputs,
        leaves its own in `io.outputs[piece.index]`; the Lightning states of `cache` (the runner's buffers) are updated
        in place. No host reads, no shapes that change: what a CUDA graph replays. The same arithmetic as `forward`."""
        model = self.model
        if piece.index == 0:  # the step's inputs; a decode step's own token is never padding (no pad mask)
            io.positions = (io.past - io.pad).clamp(min=0)[:, None]
            io.cos, io.sin = model.rotary_emb(io.positions)
            hidden = model.embed_tokens(io.ids)
        else:
            hidden = io.outputs[piece.index - 1].hidden
        ctx = AttentionContext(io.positions, io.cos, io.sin, None, None, None, cache, lightning_in_place=True)
        if piece.finishes is not None:
            hidden = model.layers[piece.finishes].sparse_outputs(hidden, io.outputs[piece.index - 1].sparse_x,
                                                                 io.attn_out)
        for i in piece.lightning:
            hidden = model.layers[i](hidden, ctx)
        out = PieceOutputs(hidden)
        if piece.starts is not None:
            out.sparse_x, out.q, out.k, out.v = model.layers[piece.starts].sparse_inputs(hidden, ctx)
        else:
            out.logits = self.lm_head(model.norm(hidden))
        io.outputs[piece.index] = out

    def decode_attention(self, piece: DecodePiece, io: DecodeIO, cache: HybridCache) -> torch.Tensor:
        """The cache update and attention of the sparse layer that `piece` started (shapes grow with the cache: run
        eagerly between the graphs). Returns the attention output (B, H, 1, D)."""
        out = io.outputs[piece.index]
        pad = cache.pad if cache.has_pad else None
        ctx = AttentionContext(io.positions, io.cos, io.sin, pad, None, None, cache)
        return self.model.layers[piece.starts].self_attn.attend_cached(out.q, out.k, out.v, ctx)

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, cache=None,
        use_cache=True, **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        model_inputs = {"attention_mask": attention_mask, "use_cache": use_cache}
        if kwargs.get("logits_to_keep") is not None:  # generate asks for the last position only: no (T, vocab) logits
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        if cache is not None and cache.get_seq_length() > 0:
            model_inputs["input_ids"] = input_ids[:, cache.get_seq_length():]
            model_inputs["cache"] = cache
        elif inputs_embeds is not None:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids
        return model_inputs


def _unusual_for_graphs(input_ids, inputs_embeds, position_ids, labels, output_hidden_states, cu_seqlens, use_cache,
                        logits_to_keep) -> str | None:
    """Why these forward arguments are not a plain decode step for the graphs (None when they are)."""
    if input_ids is None or inputs_embeds is not None:
        return "inputs_embeds"
    if input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return "not one new token per sequence"
    if not use_cache:
        return "use_cache off"
    if labels is not None:
        return "labels"
    if output_hidden_states:
        return "output_hidden_states"
    if position_ids is not None:
        return "position_ids given"
    if cu_seqlens is not None:
        return "cu_seqlens"
    if not isinstance(logits_to_keep, int):
        return "logits_to_keep indices"
    return None


__all__ = ["HybridForCausalLM", "HybridModel", "HybridPreTrainedModel"]
