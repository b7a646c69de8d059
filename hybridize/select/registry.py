"""Layer-selection methods by name, for `hybridize convert --select NAME` (and the scoring command).

Each entry is `function(model, n_sparse, **kw) -> list[int]`: the sorted indices of the `n_sparse` layers that stay
(sparse) attention. `model` is the source transformers causal LM (`model.config.num_hidden_layers` is its depth).
Extra keyword arguments (e.g. `tokenizer=`) are passed through; a method ignores those it does not use.
A method that needs no weights sets the attribute `needs_weights = False`: `convert` then passes an object that has
only `.config`, so it does not load the source model for nothing. Add a method by adding an entry to SELECTORS.
"""

from __future__ import annotations

from typing import Callable

from . import selectors as _scoring
from .placement import uniform_layers

Selector = Callable[..., list[int]]


def uniform(model, n_sparse: int, **kw) -> list[int]:
    """Evenly spaced sparse layers, the last layer always among them (hybridize.select.placement.uniform_layers)."""
    return uniform_layers(model.config.num_hidden_layers, n_sparse)


uniform.needs_weights = False

SELECTORS: dict[str, Selector] = {
    "uniform": uniform,
    "sala": _scoring.sala,  # kw: score_report=, tokenizer=, score_settings=, keep_first_last=
    "block_influence": _scoring.block_influence,
    "window": _scoring.window,  # kw: as sala, and window=, sinks=
}


def get_selector(name: str) -> Selector:
    """The method registered under `name`; a one-line error listing the registered ones otherwise."""
    try:
        return SELECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown --select method {name!r}: choose one of {', '.join(sorted(SELECTORS))} or 'layers' (with --layers)"
        ) from None


def needs_weights(selector: Selector) -> bool:
    return getattr(selector, "needs_weights", True)
