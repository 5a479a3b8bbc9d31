"""PAVE's purification of a pool as pure functions over {task: {layer: weight}} (torch only).

Each (task, layer) takes one eigendecomposition of the Gram matrix of W C_eps (spectrum and the
columns of U that the allocation can drop, together). per_layer/uniform ranks depend on one layer's spectra only: decompose, allocate, project,
layer by layer. per_model needs every layer's spectrum first, so a first pass also keeps the trailing
columns of U that the collapsed ranks can drop (up to `tail_bytes`; beyond that, pruned layers are
decomposed again). Only eps is kept per input (C_eps is rebuilt, bit-identical), so one covariance
at a time is regularised in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
from torch import Tensor

from fusion_bench_pave.pave.covariance import CovarianceStats
from fusion_bench_pave.pave.purify import context_eigh, remove_subspace
from fusion_bench_pave.pave.rank_allocation import Allocation, allocate_ranks, floor_rank, normalized_spectrum, uniform_rank
from fusion_bench_pave.pave.regularize import Regularization, regularize

Weights = Mapping[str, Mapping[str, Tensor]]  # {task: {layer: weight [out, in]}}
Progress = Callable[[Iterable, str], Iterable]  # (iterable, description) -> the same items
TAIL_BYTES = 2 * 2**30  # per_model: float64 columns of U kept between the spectra and purify passes
# what the dropped context components are removed from: the fine-tuned weight (the paper:
# tau_tilde = U_r U_r^T W_ft - W_pre) or the task vector (tau_tilde = U_r U_r^T (W_ft - W_pre))
PurifyTarget = Literal["finetuned", "task_vector"]


@dataclass(frozen=True)
class PurifySettings:
    """How PAVE allocates ranks and regularises covariances; the defaults are PAVE's (its
    constructor documents each)."""

    rho: float = 1.0
    allocation: Allocation = "per_layer"
    floor_factor: float = 1.5
    regularization: Regularization = "doubling"
    eps0: float = 0.1
    eps_tol: float = 5e-2
    relative_alpha: float = 1e-3
    purify_target: PurifyTarget = "finetuned"


@dataclass
class PurifiedLayer:
    """One layer's result: each task's purified weight (the given tensor itself at full rank)."""

    layer: str
    weights: dict[str, Tensor]
    ranks: dict[str, int]
    full_rank: int


class RegularizedCovariances:
    """C_eps of (task, layer), regularising each distinct input once and keeping only its eps. With
    `pretrained` ({task: the pretrained model's statistics on that task's calibration inputs}) eps
    must also pass the doubling check on the pretrained C (the official second pass)."""

    def __init__(
        self,
        statistics: Mapping[str, CovarianceStats],
        settings: PurifySettings,
        pretrained: Optional[Mapping[str, CovarianceStats]] = None,
    ):
        self.statistics = statistics
        self.settings = settings
        self.pretrained = pretrained
        self.eps: dict[tuple[str, str], float] = {}

    def __call__(self, task: str, layer: str) -> Tensor:
        stats = self.statistics[task]
        key = (task, stats.input_of[layer])
        cov = stats.covariance(layer)  # a new tensor: C_eps is built in place, with add_identity's bits
        if key in self.eps:
            cov.diagonal().add_(self.eps[key])
            return cov
        s = self.settings
        also = [] if self.pretrained is None else [self.pretrained[task].covariance(layer)]
        regularized, self.eps[key] = regularize(cov, s.regularization, s.eps0, s.eps_tol, s.relative_alpha, also)
        return regularized

    def eps_of(self, task: str, layer: str) -> float:
        """eps of (task, layer)'s input, regularising it first if it was not yet."""
        key = (task, self.statistics[task].input_of[layer])
        if key not in self.eps:
            self(task, layer)
        return self.eps[key]


def purifiable_layers(statistics: Mapping[str, CovarianceStats]) -> list[str]:
    """Layers with statistics in every task, in the first task's collection order."""
    tasks = list(statistics)
    return [l for l in statistics[tasks[0]].layers if all(l in statistics[t].input_of for t in tasks)]


def lowest_collapsed_fraction(shapes: Sequence[Sequence[int]], rho: float, floor_factor: float) -> float:
    """Lower bound of per_model's collapsed kept ratio: every model keeps at least each layer's floor,
    so its ratio sum_l r_ml / sum_l R_l is at least min_l floor_l / R_l."""
    fractions = [floor_rank(min(shape), rho, floor_factor) / min(shape) for shape in shapes]
    return min(fractions, default=1.0)


def _no_progress(items: Iterable, description: str) -> Iterable:
    return items


def lowest_rank(full_rank: int, settings: PurifySettings) -> int:
    """The fewest components per_layer or uniform allocation can keep of a layer (the columns of U
    before it are never dropped, so they are not formed)."""
    if settings.allocation == "uniform":
        return uniform_rank(full_rank, settings.rho)
    return floor_rank(full_rank, settings.rho, settings.floor_factor)


def _decompose(
    weights: Weights, cov_eps: RegularizedCovariances, task: str, layer: str, start: int = 0
) -> tuple[Tensor, Tensor]:
    """Columns start.. of U and all of S for (task, layer)."""
    return context_eigh(weights[task][layer], cov_eps(task, layer), start)


def _project(
    weights: Weights, layer: str, ranks: Mapping[str, int], full_rank: int, bases: Mapping[str, tuple[Tensor, int]],
    pretrained: Optional[Tensor],
) -> PurifiedLayer:
    """Each task's weight without U's columns rank.. (bases[task] holds columns start.. of U), removed
    from W_ft or, given the layer's `pretrained` weight, from the task vector W_ft - W_pre."""
    purified = {}
    for task, rank in ranks.items():
        weight = weights[task][layer]
        if rank < full_rank:
            tail, start = bases[task]
            weight = remove_subspace(weight, tail[:, rank - start :], pretrained)
        purified[task] = weight
    return PurifiedLayer(layer, purified, dict(ranks), full_rank)


@torch.no_grad()
def iter_purified(
    weights: Weights,
    statistics: Mapping[str, CovarianceStats],
    settings: PurifySettings,
    progress: Progress = _no_progress,
    tail_bytes: int = TAIL_BYTES,
    pretrained: Optional[Mapping[str, Tensor]] = None,
    pretrained_statistics: Optional[Mapping[str, CovarianceStats]] = None,
) -> Iterator[PurifiedLayer]:
    """Purify every layer of `purifiable_layers(statistics)`, yielding one layer at a time so the
    caller can write it back before the next is computed. `weights` is only read, and each layer's
    weights before that layer is yielded. `pretrained` ({layer: W_pre}) is needed, and read, only
    with purify_target="task_vector". With `pretrained_statistics` ({task: the pretrained model's
    statistics on task's calibration inputs}), as in the official code, the rank allocation's spectra
    use eps checked on the fine-tuned C alone (its first pass), the projections eps checked on both Cs
    (its second pass: the sum of their residuals below eps_tol); a (task, layer) whose two eps differ
    is decomposed again."""
    tasks = list(weights)
    layers = purifiable_layers(statistics)
    if settings.purify_target not in get_args(PurifyTarget):
        raise ValueError(f"purify_target must be one of {', '.join(get_args(PurifyTarget))}; got {settings.purify_target!r}")
    if settings.purify_target == "task_vector" and pretrained is None:
        raise ValueError("purify_target='task_vector' needs the pretrained weights of the purified layers")
    base = (lambda layer: pretrained[layer]) if settings.purify_target == "task_vector" else (lambda layer: None)
    cov_eps = RegularizedCovariances(statistics, settings)
    checked = cov_eps if pretrained_statistics is None else RegularizedCovariances(statistics, settings, pretrained_statistics)
    if pretrained_statistics is not None and (missing := [(t, l) for t in tasks for l in layers
                                                       if l not in pretrained_statistics[t].input_of]):
        task, layer = missing[0]
        raise ValueError(f"task '{task}': the pretrained model's statistics lack Linear '{layer}', whose eps "
                         "check (eps_check_pretrained) needs them")

    def recheck(task: str, layer: str) -> bool:
        """Whether the projection's eps differs from the spectrum's (a second decomposition)."""
        return checked is not cov_eps and checked.eps_of(task, layer) != cov_eps.eps_of(task, layer)

    if settings.allocation != "per_model":
        for layer in progress(layers, "PAVE purify"):
            start = lowest_rank(min(weights[tasks[0]][layer].shape), settings)
            decompositions = {task: _decompose(weights, cov_eps, task, layer, start) for task in tasks}
            spectra = {layer: [normalized_spectrum(s) for _, s in decompositions.values()]}
            kept = allocate_ranks(spectra, settings.rho, settings.allocation, settings.floor_factor)[layer]
            full_rank = len(spectra[layer][0])
            bases = {}
            for task, rank in zip(tasks, kept):
                u = decompositions[task][0]
                if rank < full_rank and recheck(task, layer):
                    u = _decompose(weights, checked, task, layer, start)[0]
                bases[task] = (u, start)
            yield _project(weights, layer, dict(zip(tasks, kept)), full_rank, bases, base(layer))
        return

    shapes = [weights[tasks[0]][layer].shape for layer in layers]
    lowest = lowest_collapsed_fraction(shapes, settings.rho, settings.floor_factor)
    spectra: dict[str, list[list[float]]] = {}
    tails: dict[tuple[str, str], tuple[Tensor, int]] = {}
    budget = tail_bytes
    for layer in progress(layers, "PAVE spectra"):
        spectra[layer] = []
        start = max(0, math.floor(lowest * min(weights[tasks[0]][layer].shape)) - 1)
        for task in tasks:
            tail, s = _decompose(weights, cov_eps, task, layer, start)
            spectra[layer].append(normalized_spectrum(s))
            if tail.numel() * tail.element_size() <= budget and not recheck(task, layer):
                budget -= tail.numel() * tail.element_size()
                tails[(task, layer)] = (tail, start)
    allocated = allocate_ranks(spectra, settings.rho, settings.allocation, settings.floor_factor)
    for layer in progress(layers, "PAVE purify"):
        ranks, full_rank = dict(zip(tasks, allocated[layer])), len(spectra[layer][0])
        bases = {}
        for task, rank in ranks.items():
            tail, start = tails.pop((task, layer), (None, 0))
            if rank >= full_rank:
                continue
            if tail is None or rank < start:  # not kept (or to be rechecked), or the collapse cut deeper
                tail, start = _decompose(weights, checked, task, layer)[0], 0
            bases[task] = (tail, start)
        yield _project(weights, layer, ranks, full_rank, bases, base(layer))


def purify(
    weights: Weights,
    statistics: Mapping[str, CovarianceStats],
    settings: PurifySettings,
    progress: Progress = _no_progress,
    write: Optional[Callable[[str, str, Tensor], None]] = None,
    pretrained: Optional[Mapping[str, Tensor]] = None,
    pretrained_statistics: Optional[Mapping[str, CovarianceStats]] = None,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, int]], dict[str, int]]:
    """All of `iter_purified`: purified weights {task: {layer: W}}, kept ranks {task: {layer: r}}
    and full ranks {layer: R}. With `write`, each purified weight goes to write(task, layer, W) as
    soon as its layer is done and the returned weights are empty (nothing held twice). `pretrained`:
    as in `iter_purified`."""
    purified: dict[str, dict[str, Tensor]] = {task: {} for task in weights}
    ranks: dict[str, dict[str, int]] = {task: {} for task in weights}
    full_ranks: dict[str, int] = {}
    for layer in iter_purified(weights, statistics, settings, progress, pretrained=pretrained,
                               pretrained_statistics=pretrained_statistics):
        for task, weight in layer.weights.items():
            if write is None:
                purified[task][layer.layer] = weight
            else:
                write(task, layer.layer, weight)
            ranks[task][layer.layer] = layer.ranks[task]
        full_ranks[layer.layer] = layer.full_rank
    return purified, ranks, full_ranks
