"""Meta's original Llama release format: params.json + consolidated.00.pth, consolidated.01.pth, ...

Each shard holds one model-parallel slice of every tensor. Column-parallel weights (wq, wk, wv, w1, w3, output) are
split along the output rows (dim 0), row-parallel weights (wo, w2) along the input columns (dim 1); the embedding is
split along the hidden dim (dim 1, Llama 1/2) or the vocabulary (dim 0, Llama 3): the shard shapes tell which.
Norms are replicated. Meta rotates (q, k) as complex pairs of adjacent features (2i, 2i+1); transformers' Llama
rotates feature i with feature i + d/2 of each head. Reordering each head's q and k rows to
[0, 2, 4, ..., d-2, 1, 3, ..., d-1] turns one layout into the other (attention scores are unchanged).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import Checkpoint, load_pickle, read_config
from .errors import CorruptCheckpointError, MissingConfigError, WeightMismatchError
from .safetensors_io import TensorSpec

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
_IGNORED = ("rope.freqs",)


def is_meta_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def hf_name(meta_name: str) -> str | None:
    """transformers' Llama name of a Meta tensor name (None for tensors with no counterpart, e.g. rope.freqs)."""
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    m = _LAYER.match(meta_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def interleaved_to_half_split(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's rows from Meta's pairwise RoPE layout to transformers' half-split layout."""
    head_dim = weight.shape[0] // num_heads
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    order = (torch.arange(num_heads).unsqueeze(1) * head_dim + within).reshape(-1)
    return weight.index_select(0, order.to(weight.device))


def _concat_dim(meta_name: str, shard_shapes: list[tuple[int, ...]], dim: int) -> int | None:
    """Dimension along which the model-parallel shards of a tensor are joined (None: replicated)."""
    if len(shard_shapes) == 1 or len(shard_shapes[0]) == 1:
        return None
    if meta_name == "tok_embeddings.weight":
        return 0 if shard_shapes[0][1] == dim else 1
    return 1 if meta_name.endswith(_ROW_PARALLEL) else 0


def read_params(folder: Path) -> dict:
    """params.json as a mapping with integer dim, n_layers and n_heads; one-line errors that say what to do."""
    where = folder / "params.json"
    if not where.is_file():
        raise MissingConfigError(f"{folder} has consolidated.*.pth weights but no params.json: put Meta's params.json "
                                 "from the same download beside them, or pass a transformers config.json with --config")
    try:
        params = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MissingConfigError(f"{where} is not readable JSON ({str(e).splitlines()[0]}): re-download it") from None
    if not isinstance(params, dict):
        raise MissingConfigError(f"{where} holds a {type(params).__name__}, not a mapping: is it a Meta Llama "
                                 "params.json?")
    try:
        for key in ("dim", "n_layers", "n_heads"):
            params[key] = int(params[key])
    except (KeyError, TypeError, ValueError):
        raise MissingConfigError(f"{where} lacks an integer dim, n_layers or n_heads: is it a Meta Llama "
                                 "params.json?") from None
    return params


def open_meta(folder: Path, config: str | os.PathLike | None = None):
    shards = sorted(folder.glob("consolidated.*.pth"), key=lambda p: int(p.name.split(".")[1]))
    if not shards:
        raise MissingConfigError(f"{folder} has params.json but no consolidated.*.pth files")
    given = read_config(config) if config is not None else None
    params = read_params(folder) if given is None else None
    shard_shapes: dict[str, list[tuple[int, ...]]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in shards:
        state = load_pickle(path)
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor) and name not in _IGNORED:
                shard_shapes.setdefault(name, []).append(tuple(tensor.shape))
                dtypes[name] = tensor.dtype
        del state
    uneven = [n for n, s in shard_shapes.items() if len(s) != len(shards)]
    if uneven:
        raise WeightMismatchError(f"{uneven[0]} is not in every consolidated.*.pth shard of {folder}: re-download it")
    unknown = [n for n in shard_shapes if hf_name(n) is None]
    if unknown:
        raise WeightMismatchError(f"{folder} holds {unknown[0]}, which is not part of a Meta Llama checkpoint")

    dim = params["dim"] if given is None else given.hidden_size
    specs: dict[str, TensorSpec] = {}
    joins: dict[str, int | None] = {}
    for name, shapes in shard_shapes.items():
        join = _concat_dim(name, shapes, dim)
        joins[name] = join
        shape = list(shapes[0])
        if join is not None:
            shape[join] = sum(s[join] for s in shapes)
        specs[hf_name(name)] = TensorSpec(tuple(shape), dtypes[name], shards[0])

    if config is not None:
        cfg, cfg_file = given, str(config)
    else:
        cfg, cfg_file = llama_config_from_params(params, specs, folder), str(folder / "params.json")
    heads = cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        states = [load_pickle(p) for p in shards]
        for name in shard_shapes:
            parts = [s[name] for s in states]
            tensor = parts[0] if joins[name] is None else torch.cat(parts, dim=joins[name])
            if name.endswith("attention.wq.weight"):
                tensor = interleaved_to_half_split(tensor, heads)
            elif name.endswith("attention.wk.weight"):
                tensor = interleaved_to_half_split(tensor, kv_heads)
            yield hf_name(name), tensor
            for s in states:
                del s[name]  # drop each slice once used

    return Checkpoint(
        source=str(folder), format="meta", config=cfg, config_file=cfg_file, specs=specs, stream=stream,
        folder=folder, notes=[] if config is not None else ["config derived from params.json"],
    )


def llama_config_from_params(params: dict, specs: dict[str, TensorSpec], folder: Path):
    """A LlamaConfig from Meta's params.json; vocabulary and MLP sizes are read off the tensor shapes."""
    from transformers import LlamaConfig

    where = folder / "params.json"
    try:
        dim, layers, heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except (KeyError, TypeError, ValueError):
        raise MissingConfigError(f"{where} lacks dim, n_layers or n_heads: is it a Meta Llama params.json?") from None
    embed = specs.get("model.embed_tokens.weight")
    gate = specs.get("model.layers.0.mlp.gate_proj.weight")
    if embed is None or gate is None:
        raise WeightMismatchError(f"{folder} lacks tok_embeddings or layers.0.feed_forward.w1: not a Meta Llama model")
    vocab = embed.shape[0]
    rope_theta = float(params.get("rope_theta", 10000.0))
    if params.get("use_scaled_rope"):
        # Llama 3.1+ frequency scaling (Meta's apply_scaling): factor 8 unless params.json names another (3.2: 32).
        rope = {"rope_type": "llama3", "rope_theta": rope_theta,
                "factor": float(params.get("rope_scaling_factor", params.get("scale_factor", 8.0))),
                "low_freq_factor": float(params.get("low_freq_factor", 1.0)),
                "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(params.get("original_max_position_embeddings", 8192))}
        max_pos = 131072
    else:
        rope = {"rope_type": "default", "rope_theta": rope_theta}
        max_pos = 8192 if vocab >= 128000 else (4096 if "n_kv_heads" in params or rope_theta != 10000.0 else 2048)
    llama3_vocab = vocab >= 128000
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=gate.shape[0],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(params.get("n_kv_heads") or heads),
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            max_position_embeddings=int(params.get("max_seq_len", max_pos)),
            rope_parameters=rope,
            tie_word_embeddings="lm_head.weight" not in specs,
            bos_token_id=128000 if llama3_vocab else 1,
            eos_token_id=128001 if llama3_vocab else 2,
        )
    except (TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{where} does not describe a valid Llama: {str(e).splitlines()[0]}") from None
