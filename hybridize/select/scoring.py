"""SALA's layer score and the rules that turn per-layer scores into a set of sparse (attention) layers."""

from __future__ import annotations

from collections.abc import Sequence

SCORE_CAP = 50.0
SCORE_EPS = 1e-10


def sala_scores(C: Sequence[float], R: Sequence[float], cap: float = SCORE_CAP, eps: float = SCORE_EPS) -> list[float]:
    """score_i = min(cap, (max_j R_j - R_i) / (max_j C_j - C_i + eps)) with C and R abilities (higher is better)
    measured with layer i swapped for its Lightning student (HALO/SALA). High score: losing layer i's attention costs
    much retrieval for little general ability, so it stays attention."""
    if len(C) != len(R) or not C:
        raise ValueError(f"need one C and one R per layer, got {len(C)} and {len(R)}")
    c_max, r_max = max(C), max(R)
    return [min(cap, (r_max - r) / (c_max - c + eps)) for c, r in zip(C, R)]


def top_layers(scores: Sequence[float], n_sparse: int, *, keep_first_last: bool = True,
               tie_break: Sequence[float] | None = None) -> list[int]:
    """The `n_sparse` highest-scoring layers (sorted). With `keep_first_last`, layers 0 and L-1 are always among them
    (SALA) and the rest are the best of the others. Ties go to the higher `tie_break` value, then the lower index."""
    L = len(scores)
    if not 0 <= n_sparse <= L:
        raise ValueError(f"cannot keep {n_sparse} sparse layers in a model of {L} layers")
    forced = [0, L - 1] if keep_first_last and L > 1 else ([0] if keep_first_last else [])
    forced = forced[:n_sparse]
    tb = tie_break if tie_break is not None else [0.0] * L
    rest = sorted((i for i in range(L) if i not in forced), key=lambda i: (-scores[i], -tb[i], i))
    return sorted(forced + rest[: n_sparse - len(forced)])
