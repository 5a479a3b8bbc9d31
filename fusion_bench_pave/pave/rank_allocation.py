"""Spectral rank allocation: split a global kept-rank ratio rho across the T models of each layer.

Dropping component i of model m costs s_i^2 with s = S / S_1 (normalised activated pruning error).
The search is the official one (github ABgit111/purified_task_vector, rank_strategy.py): drop the
globally smallest remaining s while kept/(T*R) >= rho and some model is above the floor. Greedy is
optimal because each model's costs are sorted, so every model drops a suffix of its spectrum.
"""

from __future__ import annotations

import heapq
import math
from typing import Literal, Mapping, Sequence

from torch import Tensor

Allocation = Literal["per_layer", "per_model", "uniform"]


def rank_budget(full_rank: int, num_models: int, rho: float) -> int:
    """Total components one layer keeps over all models when the floor does not bind: the largest k
    with k / (T*R) < rho, tested in floating point as the official loop tests it. That is
    floor(rho*T*R), or one fewer when rho*T*R is an integer (the search stops strictly below rho)."""
    total = num_models * full_rank
    kept = min(total, math.ceil(rho * total))
    while kept > 0 and kept / total >= rho:
        kept -= 1
    while (kept + 1) / total < rho:
        kept += 1
    return kept


def floor_rank(full_rank: int, rho: float, floor_factor: float = 1.5) -> int:
    """Fewest components any model keeps: R - round(factor * (R - round(rho * R))), at least 1.

    The floor wins over the budget, as in the official search: when round(rho * R) rounds up to R
    (R=32, rho=63/64) nothing is dropped, and rho=1 keeps every component."""
    dropped = full_rank - round(rho * full_rank)
    return max(1, full_rank - round(floor_factor * dropped))


def uniform_rank(full_rank: int, rho: float) -> int:
    """Components every model keeps under uniform allocation: max(1, floor(rho * R))."""
    return max(1, math.floor(rho * full_rank + 1e-9))


def layer_total(full_rank: int, num_models: int, rho: float, floor_factor: float = 1.5) -> int:
    """Components one layer keeps over all models: the budget, or T floors where those are more."""
    return max(rank_budget(full_rank, num_models, rho), num_models * floor_rank(full_rank, rho, floor_factor))


def normalized_spectrum(singular_values: Tensor) -> list[float]:
    """s_i = S_i / S_1 as floats (all zeros for a zero matrix)."""
    top = float(singular_values[0]) if singular_values.numel() else 0.0
    if top <= 0:
        return [0.0] * singular_values.numel()
    return (singular_values / top).tolist()


def allocate_layer(spectra: Sequence[Sequence[float]], rho: float, floor_factor: float = 1.5) -> list[int]:
    """Kept ranks per model for one layer: drop the globally smallest remaining s_i (ties: the lowest
    model index, as the official loop) until `layer_total` components are left, none below the floor."""
    full_rank = len(spectra[0])
    if any(len(s) != full_rank for s in spectra):
        raise ValueError("all models of a layer must have the same number of singular values")
    floor = floor_rank(full_rank, rho, floor_factor)
    budget = rank_budget(full_rank, len(spectra), rho)
    if budget < len(spectra):
        raise ValueError(
            f"rho={rho} leaves fewer than one component per model (R={full_rank}, T={len(spectra)}, "
            f"budget {budget}); raise rho."
        )
    kept = [full_rank] * len(spectra)
    # s orders the components as their cost s^2 does, without squaring distinct values into a tie
    heap = [(s[full_rank - 1], m) for m, s in enumerate(spectra) if full_rank > floor]
    heapq.heapify(heap)
    for _ in range(len(spectra) * full_rank - layer_total(full_rank, len(spectra), rho, floor_factor)):
        _, m = heapq.heappop(heap)
        kept[m] -= 1
        if kept[m] > floor:
            heapq.heappush(heap, (spectra[m][kept[m] - 1], m))
    return kept


def allocate_ranks(
    spectra: Mapping[str, Sequence[Sequence[float]]],
    rho: float,
    allocation: Allocation = "per_layer",
    floor_factor: float = 1.5,
) -> dict[str, list[int]]:
    """Kept rank per (layer, model) from normalised spectra {layer: [s of model 0, s of model 1, ...]}.

    per_layer: greedy optimum per layer. per_model (official ViT/GLUE code): collapse the per-layer
    result to one ratio per model, sum_l r_ml / sum_l R_l, and cut every layer to max(1, round(ratio*R_l)).
    uniform: every model keeps max(1, floor(rho * R_l)).
    """
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if allocation == "uniform":
        return {l: [uniform_rank(len(s[0]), rho)] * len(s) for l, s in spectra.items()}
    ranks = {l: allocate_layer(s, rho, floor_factor) for l, s in spectra.items()}
    if allocation == "per_layer":
        return ranks
    if allocation != "per_model":
        raise ValueError(f"allocation must be per_layer, per_model or uniform, got {allocation!r}")
    full = {l: len(s[0]) for l, s in spectra.items()}
    total = sum(full.values())
    num_models = len(next(iter(ranks.values())))
    ratios = [sum(r[m] for r in ranks.values()) / total for m in range(num_models)]
    return {l: [max(1, round(ratios[m] * full[l])) for m in range(num_models)] for l in ranks}
