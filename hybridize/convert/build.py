"""Build a hybrid from a Llama-shaped source: the config, and the weights tensor by tensor.

Weights arrive under Llama's names ("model.layers.3.self_attn.k_proj.weight", ...); family adapters translate other
naming schemes to these first. Each source tensor maps to one or more hybrid tensors, so a converter can stream a
checkpoint shard by shard and never hold two copies of the model.

Reuse rules (docs/design.md §3.1, §3.2):
- Lightning layers: W_q, W_o copied; W_k, W_v (and biases) expanded to one head per query head (GQA ->
  MHA, repeat_interleave); per-head q/k RMSNorm copied when the source has them, else ones; output norm ones.
- Sparse layers: every projection copied as is (GQA kept); q/k norms copied when present.
- Output gates (new): zero-initialised, so sigmoid gives 0.5, and the layer's W_o is doubled to compensate. A fresh
  conversion with gates therefore computes exactly what it computes without them.
- With a Lightning window (config.lightning_window): the window branch is the source's attention cut to the window,
  and the recurrent branch starts at zero (output norm zeros; W_o not doubled, as the branch through it is ungated),
  so a fresh conversion computes the windowed source exactly.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from ..arch.configuration_hybridize import LIGHTNING, SPARSE, HybridConfig
from ..common import source_context

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(.+)$")


def rope_parameters_of(config) -> dict:
    """The source's RoPE settings in transformers 5.x form, whatever version wrote the config."""
    params = getattr(config, "rope_parameters", None)
    if params:
        if "rope_theta" in params or "rope_type" in params:
            return dict(params)
        # per-layer-type dict (e.g. {"full_attention": {...}}): take the full-attention entry
        first = params.get("full_attention") or next(iter(params.values()))
        return dict(first)
    out = dict(getattr(config, "rope_scaling", None) or {})
    out.setdefault("rope_type", out.pop("type", "default"))
    out["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    return out


def hybrid_config_from_source(
    src,
    layer_types: list[str],
    *,
    hype: bool = True,
    output_gates: bool = True,
    qkv_bias: bool | None = None,
    o_bias: bool | None = None,
    qk_norm: bool = False,
    rope_yarn: float = 0.0,
    **overrides,
) -> HybridConfig:
    """A HybridConfig with the shape of a Llama-family transformers config `src`. `rope_yarn` (0: off): RoPE rescaled
    YaRN-style by that factor over the source's context, in every layer (`yarn_rope`). With a `lightning_window`
    override and no `lightning_sink_reach`, the reach is the source's context (at least twice the window)."""
    heads = src.num_attention_heads
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // heads
    attention_bias = bool(getattr(src, "attention_bias", False))
    tie = getattr(src, "tie_word_embeddings", None)
    if tie is None and hasattr(src, "get_text_config"):
        tie = getattr(src.get_text_config(), "tie_word_embeddings", False)
    kwargs = dict(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(src, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_act=getattr(src, "hidden_act", "silu"),
        max_position_embeddings=getattr(src, "max_position_embeddings", 2048),
        initializer_range=getattr(src, "initializer_range", 0.02),
        rms_norm_eps=getattr(src, "rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(tie),
        rope_parameters=rope_parameters_of(src),
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias if o_bias is None else o_bias,
        mlp_bias=bool(getattr(src, "mlp_bias", False)),
        qk_norm=qk_norm,
        layer_types=layer_types,
        hype=hype,
        output_gates=output_gates,
        source_model_type=getattr(src, "model_type", None),
        pad_token_id=getattr(src, "pad_token_id", None),
        bos_token_id=getattr(src, "bos_token_id", None),
        eos_token_id=getattr(src, "eos_token_id", None),
    )
    if rope_yarn:
        kwargs["rope_parameters"], kwargs["max_position_embeddings"] = yarn_rope(
            kwargs["rope_parameters"], kwargs["max_position_embeddings"], rope_yarn)
    kwargs.update(overrides)
    reach = kwargs.pop("lightning_sink_reach", None)
    if reach is None and kwargs.get("lightning_window"):
        # default: the window branch's sinks read from at most the source's context (HybridConfig's field)
        reach = max(source_context(src) or 0, 2 * kwargs["lightning_window"])
    return HybridConfig(**kwargs, **({} if reach is None else {"lightning_sink_reach": reach}))


def check_rope_yarn(factor: float, *, off_allowed: bool = True) -> None:
    """`rope_yarn` is a factor above 1, or 0 (off) where `off_allowed`."""
    if (factor or not off_allowed) and not factor > 1:
        raise ValueError(f"rope_yarn (--rope-yarn) must be 0 (off) or a factor above 1 over the source's context, "
                         f"got {factor}")


def yarn_rope(params: dict, context: int, factor: float) -> tuple[dict, int]:
    """The source's plain RoPE settings rescaled YaRN-style by `factor` over its `context`, and the new context.
    Measured on SmolLM2 (bench/results/retention.md, fifteenth session): the windowed hybrid's Lightning windows read
    each sequence's first tokens from any distance, so rescaling the whole layers alone left 16K out of reach."""
    check_rope_yarn(factor, off_allowed=False)
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_yarn rescales plain RoPE; this source's RoPE is already {params['rope_type']!r}")
    return ({**params, "rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": context},
            int(context * factor))


def _expand_heads(t: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """(Hkv*D, ...) -> (H*D, ...): one copy of each KV head for every query head of its group."""
    group = heads // kv_heads
    if group == 1:
        return t
    return t.reshape(kv_heads, -1, *t.shape[1:]).repeat_interleave(group, dim=0).reshape(-1, *t.shape[1:])


def map_tensor(name: str, tensor: torch.Tensor, config: HybridConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Hybrid tensors made from one source tensor (Llama names)."""
    m = _LAYER_RE.match(name)
    if m is None:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            return  # tied: the embedding is the head
        yield name, tensor
        return
    layer, rest = int(m.group(1)), m.group(2)
    kind = config.layer_types[layer]
    if kind == LIGHTNING and rest.split(".")[0] in ("k_proj", "v_proj") and config.lightning_kv_heads == "query":
        tensor = _expand_heads(tensor, config.num_key_value_heads, config.num_attention_heads)
    if rest == "o_proj.weight" and config.output_gates and not (kind == LIGHTNING and config.lightning_window):
        tensor = tensor * 2.0  # compensates sigmoid(0) = 0.5 of the zero-initialised gate
    if kind == SPARSE and rest.startswith(("q_norm", "k_norm")) and not config.qk_norm:
        return
    yield name, tensor


def added_tensors(
    config: HybridConfig, present: set[str], dtype: torch.dtype, device: torch.device | str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """New hybrid parameters that no source tensor provides (q/k norms, output norms, gates).
    `device="meta"` gives their shapes without allocating (to plan an output before writing it)."""
    hd = config.num_attention_heads * config.head_dim
    for i, kind in enumerate(config.layer_types):
        p = f"model.layers.{i}.self_attn."
        if kind == LIGHTNING:
            for norm in ("q_norm.weight", "k_norm.weight"):
                if p + norm not in present:
                    yield p + norm, torch.ones(config.head_dim, dtype=dtype, device=device)
            start = torch.zeros if config.lightning_window else torch.ones  # the window branch carries the source
            yield p + "o_norm.weight", start(hd, dtype=dtype, device=device)
            if config.output_gates:
                yield p + "z_proj.weight", torch.zeros(hd, config.hidden_size, dtype=dtype, device=device)
        elif config.output_gates:
            yield p + "g_proj.weight", torch.zeros(hd, config.hidden_size, dtype=dtype, device=device)


def hybrid_state_dict(source_state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """All hybrid tensors from an in-memory source state dict (Llama names)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in source_state.items():
        for new_name, new_tensor in map_tensor(name, tensor, config):
            out[new_name] = new_tensor
    first = next(iter(source_state.values()))
    # on the source's device: a hybrid built from a model on the GPU (the layer scores' swaps) must be whole there
    out.update(added_tensors(config, set(out), first.dtype, first.device))
    return out


def build_hybrid(source_model, layer_types: list[str], **config_options):
    """A HybridForCausalLM from an in-memory Llama-family transformers model, reusing its weights."""
    from ..arch.modeling_hybridize import HybridForCausalLM

    config = hybrid_config_from_source(source_model.config, layer_types, **config_options)
    state = hybrid_state_dict(source_model.state_dict(), config)
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not match the hybrid: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.to(next(source_model.parameters()).dtype)
    model.generation_config = source_model.generation_config
    return model.eval()
