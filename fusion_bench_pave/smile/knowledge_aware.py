"""Knowledge-aware SMILE (PAVE-SMILE): low-rank experts and routers built in each task's input subspace.

Plain SMILE factorises the task difference dW_i = W_i - W_0 by its plain SVD. PAVE (arXiv 2510.14697)
argues that the components that matter are those of W C, with C the task's (regularised) input
covariance. For expert i, with C = C_eps of task i's inputs to the layer and C = L L^T (Cholesky):

- Expert, ``subspace="knowledge_aware"`` (PAVE's context-oriented basis): dW_i C = U S V^T and the
  expert is the projection U_k U_k^T dW_i of the task difference onto the top-k context directions
  (PAVE's purification applied to dW_i). Among rank-k left projections P it minimises
  ||(dW_i - P dW_i) C||_F.
- Expert, ``subspace="whitened"``: the same with dW_i L, minimising ||(dW_i - P dW_i) L||_F^2 =
  E||(dW_i - P dW_i) x||^2 over task i's inputs, the expected squared output error itself.
  Both are stored as ``expert_u = U_k``, ``expert_svh = U_k^T dW_i``.
- Router (both): dW_i L = U' S' V'^T and the router rows are the leading whitened right singular
  directions mapped back to input space, G_i = V'_g^T L^-1, so ||G_i x|| = ||V'_g^T z|| with
  z = L^-1 x: how strongly x, in task i's whitened coordinates, excites the directions that carry
  task i's expected output change E||dW_i x||^2. The rows are orthonormal under C: G_i C G_i^T = I.

With C = I (L = I) every SVD is the plain SVD of dW_i: U_k and the router are bit-identical to plain
SMILE's, and U_k^T dW_i equals S_k V_k^T up to rounding. Products with C or L are taken in float64 and
cast to the SVD dtype (float32 for float32 weights, as plain SMILE), so C = I changes no bit of the
SVD input.

Rank allocation (``spectral``): every layer has one expert rank k_l shared by its T experts (the
experts are stacked). Layers of the same shape (m, n) share the budget k * (number of such layers),
split by PAVE's greedy spectral allocation (``pave.rank_allocation.allocate_layer``) over the
layer spectra sqrt(mean_i (S_ij / S_i1)^2) of the expert SVDs, so each rank unit costs T (m + n)
parameters in every group and the total expert parameter count equals plain SMILE's at rank k
exactly. Each layer keeps at least one component.

Measured (benchmarks/pave_smile.py, results in benchmarks/results/pave_smile/): NOT better than plain
SMILE. On the MiniLM text zoo at equal parameter counts, knowledge_aware and whitened lose 1.1-2.7
points of test accuracy at every k (plain 81.3 / 82.2 / 82.4 at k = 4 / 16 / 64, knowledge_aware
78.6 / 80.9 / 81.1); swapping routers (benchmarks/pave_smile_swap.py, k=16) shows both halves cost
accuracy (whitened router -1.4, context experts -0.6). The spectral allocation is neutral
(plain + spectral ties plain). The option stays, off
by default (``subspace: plain``), as a cheap documented research path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from fusion_bench_pave.pave.rank_allocation import allocate_layer
from fusion_bench_pave.smile.svd import SvdMethod, top_svd

Subspace = Literal["plain", "knowledge_aware", "whitened"]
SUBSPACES = ("plain", "knowledge_aware", "whitened")
RankAllocation = Literal["uniform", "spectral"]


def _times(matrix: Tensor, factor: Tensor, dtype: torch.dtype) -> Tensor:
    """matrix @ factor in float64, cast to ``dtype`` (exact when ``factor`` is the identity)."""
    return (matrix.to(torch.float64) @ factor.to(matrix.device, torch.float64)).to(dtype)


def whitening_factor(cov_eps: Tensor, name: str = "layer") -> Tensor:
    """Lower Cholesky factor L (float64) of C_eps = L L^T; a clear error if C_eps is not positive definite."""
    if cov_eps.ndim != 2 or cov_eps.shape[0] != cov_eps.shape[1]:
        raise ValueError(f"{name}: covariance must be a square matrix, got shape {tuple(cov_eps.shape)}")
    factor, info = torch.linalg.cholesky_ex(cov_eps.to(torch.float64))
    if int(info) != 0:
        raise ValueError(f"{name}: input covariance is not positive definite; regularise it (C + eps I) first")
    return factor


def expert_factor(cov_eps: Tensor, subspace: Subspace, name: str = "layer") -> Tensor:
    """The right factor F of the expert SVD dW F: C_eps (knowledge_aware) or its Cholesky factor L (whitened)."""
    if subspace == "knowledge_aware":
        return cov_eps
    if subspace == "whitened":
        return whitening_factor(cov_eps, name)
    raise ValueError(f"{name}: no covariance factor for subspace {subspace!r}; expected 'knowledge_aware' or 'whitened'")


def context_spectrum(dw: Tensor, factor: Tensor | None) -> Tensor:
    """Singular values of dW F (of dW when ``factor`` is None), in float64, descending."""
    product = dw.to(torch.float64) if factor is None else _times(dw, factor, torch.float64)
    return torch.linalg.svdvals(product)


def context_expert(dw: Tensor, factor: Tensor, k: int, rank: int, svd_method: SvdMethod = "auto") -> tuple[Tensor, Tensor]:
    """(U_k [m, k], U_k^T dW [k, n]) in ``dw``'s dtype from the top-``rank`` (>= k) SVD of dW F.

    ``factor`` F is C_eps or L (see :func:`expert_factor`). The projection U_k^T dW is accumulated
    in float64 (one rounding to ``dw``'s dtype).
    """
    t = top_svd(_times(dw, factor, dw.dtype), rank, svd_method)
    u = t.u[:, :k]
    return u, _times(u.T, dw, dw.dtype)


def whitened_router(source: Tensor, factor: Tensor, gate_k: int, rank: int, svd_method: SvdMethod = "auto") -> Tensor:
    """Router rows V'_g^T L^-1 [g, n] in ``source``'s dtype, from the top-``rank`` (>= g) SVD of source L.

    ``factor`` is the Cholesky factor L of C_eps (:func:`whitening_factor`).
    """
    factor = factor.to(source.device, torch.float64)
    t = top_svd(_times(source, factor, source.dtype), rank, svd_method)
    rows = torch.linalg.solve_triangular(factor.T, t.v[:, :gate_k].to(torch.float64), upper=True)
    return rows.T.to(source.dtype)


def layer_spectrum(spectra: Sequence[Tensor]) -> list[float]:
    """One layer's allocation spectrum from its experts' singular values: sqrt(mean_i (S_ij / S_i1)^2).

    Dropping component j of the shared rank then costs the mean normalised activated error over
    the experts (PAVE's per-model cost s_j^2, averaged); it is descending like each expert's spectrum.
    """
    normalized = [s / s[0] if float(s[0]) > 0 else torch.zeros_like(s) for s in spectra]
    return torch.stack(normalized).square().mean(0).sqrt().tolist()


def allocate_expert_ranks(spectra: Mapping[str, Sequence[float]], shapes: Mapping[str, tuple[int, int]], k: int) -> dict[str, int]:
    """Expert rank per layer: ``k`` times the layer count of each (m, n) shape, split greedily by spectrum.

    ``spectra[layer]`` has min(m, n) descending entries (see :func:`layer_spectrum`). Within a shape
    group the kept ranks sum to exactly ``k`` per layer; each layer keeps between 1 and min(m, n).
    """
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for layer, shape in shapes.items():
        groups[tuple(shape)].append(layer)
    ranks: dict[str, int] = {}
    for (m, n), layers in groups.items():
        full = min(m, n)
        if not 1 <= k <= full:
            raise ValueError(f"spectral rank allocation needs 1 <= k <= {full} for {m}x{n} layers, got k={k}")
        if any(len(spectra[layer]) != full for layer in layers):
            raise ValueError(f"every {m}x{n} layer needs {full} singular values for the allocation")
        # floor_factor = full makes PAVE's floor rule keep at least one component per layer
        kept = allocate_layer([spectra[layer] for layer in layers], k / full, floor_factor=float(full))
        if sum(kept) != k * len(layers):
            raise RuntimeError(f"rank allocation kept {sum(kept)} components for {len(layers)} {m}x{n} layers, expected {k * len(layers)}")
        ranks.update(zip(layers, kept))
    return ranks


def expert_parameter_count(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], num_experts: int) -> int:
    """Low-rank expert parameters T * sum_l k_l (m_l + n_l) (routers and biases excluded)."""
    return num_experts * sum(ranks[layer] * (m + n) for layer, (m, n) in shapes.items())

