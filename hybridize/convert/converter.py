"""`hybridize convert`: source checkpoint -> self-contained hybrid model folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..export import save_hybrid
from ..select.placement import layer_types_from, num_sparse_layers, parse_ratio, uniform_layers
from .build import build_hybrid
from .default_model import load_default_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertResult:
    output: Path
    sparse_layers: list[int]
    num_layers: int
    source: str
    extras: dict = field(default_factory=dict)


def choose_sparse_layers(num_layers: int, ratio: str = "1:3", layers: list[int] | None = None) -> list[int]:
    if layers is not None:
        layer_types_from(num_layers, layers)  # range check
        return sorted(set(layers))
    sparse, linear = parse_ratio(ratio)
    return uniform_layers(num_layers, num_sparse_layers(num_layers, sparse, linear))


def convert(
    source: str | None = None,
    output: str | Path = "hybrid-model",
    *,
    ratio: str = "1:3",
    layers: list[int] | None = None,
    hype: bool = True,
    gates: bool = True,
    dtype: str | None = None,
    force: bool = False,
) -> ConvertResult:
    if source is not None:
        raise NotImplementedError("only the default model converts yet")
    model, tokenizer = load_default_model()
    sparse_layers = choose_sparse_layers(model.config.num_hidden_layers, ratio, layers)
    types = layer_types_from(model.config.num_hidden_layers, sparse_layers)
    hybrid = build_hybrid(model, types, hype=hype, output_gates=gates)
    if dtype is not None:
        hybrid.to(DTYPES[dtype])
    save_hybrid(hybrid, output, tokenizer=tokenizer, force=force)
    return ConvertResult(Path(output), sparse_layers, model.config.num_hidden_layers, "SmolLM2-135M-Instruct (GGUF)")
