"""Which layers stay (sparse) attention: ratio parsing, the count rule and the uniform placement."""

from __future__ import annotations

import math
import re

from ..arch.configuration_hybridize import LIGHTNING, SPARSE


class RatioError(ValueError):
    pass


def parse_ratio(text: str) -> tuple[int, int]:
    """'1:3' -> (1, 3): sparse parts to Lightning parts. Both non-negative integers, not both zero."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if m is None:
        raise RatioError(f"--ratio must look like SPARSE:LINEAR with non-negative integers (e.g. 1:3), got {text!r}")
    sparse, linear = int(m.group(1)), int(m.group(2))
    if sparse == 0 and linear == 0:
        raise RatioError("--ratio 0:0 selects nothing: at least one side must be positive (e.g. 1:3)")
    return sparse, linear


def num_sparse_layers(num_layers: int, sparse: int, linear: int) -> int:
    """Rounding rule: round(L * s / (s + l)) with halves rounded up, then at least 1 sparse layer when s > 0 and at
    least 1 Lightning layer when l > 0 (so 1:3 on 30 layers keeps 8, on 32 keeps 8, on 2 keeps 1)."""
    n = math.floor(num_layers * sparse / (sparse + linear) + 0.5)
    if sparse > 0:
        n = max(n, 1)
    if linear > 0:
        n = min(n, num_layers - 1)
    return n


def uniform_layers(num_layers: int, n_sparse: int) -> list[int]:
    """Evenly spaced sparse layers, the last layer always among them (1:3 on 8 layers -> [3, 7])."""
    if n_sparse <= 0:
        return []
    if n_sparse >= num_layers:
        return list(range(num_layers))
    step = num_layers / n_sparse
    return sorted({num_layers - 1 - int(i * step) for i in range(n_sparse)})


def layer_types_from(num_layers: int, sparse_layers: list[int]) -> list[str]:
    bad = [i for i in sparse_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer index {bad[0]} is out of range: the model has layers 0..{num_layers - 1}")
    chosen = set(sparse_layers)
    return [SPARSE if i in chosen else LIGHTNING for i in range(num_layers)]


def sparse_count(num_layers: int, ratio: str) -> int:
    """How many of `num_layers` layers a SPARSE:LINEAR ratio keeps sparse (num_sparse_layers' rounding rule)."""
    sparse, linear = parse_ratio(ratio)
    return num_sparse_layers(num_layers, sparse, linear)


def layer_types_for(num_layers: int, ratio: str = "1:3", layers: list[int] | None = None) -> list[str]:
    """The layer types of a hybrid: sparse at `layers` (range-checked), or without them at the ratio's count of
    evenly spaced layers (uniform_layers)."""
    if layers is None:
        layers = uniform_layers(num_layers, sparse_count(num_layers, ratio))
    return layer_types_from(num_layers, layers)


def sparse_indices(layer_types: list[str]) -> list[int]:
    return [i for i, t in enumerate(layer_types) if t == SPARSE]
