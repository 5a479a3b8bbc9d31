"""Top-r singular triplets of a weight (difference) matrix.

SMILE only needs the leading ``max(gate_k, k)`` singular triplets of each ``dW``. For large
matrices and small ranks a seeded randomized SVD (Halko et al. 2011, with power iterations) is
much faster than a full SVD; we iterate until the captured energy has converged and fall back to
the full SVD when it does not, so callers get a near-optimal rank-r factorisation either way.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

SvdMethod = Literal["auto", "full", "randomized"]


class Triplets(NamedTuple):
    """``u`` [m, r], ``s`` [r] (descending), ``v`` [n, r] with ``A ~= u @ diag(s) @ v.T``."""

    u: Tensor
    s: Tensor
    v: Tensor


def _compute_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def full_svd(w: Tensor, rank: int) -> Triplets:
    """Exact leading ``rank`` triplets from ``torch.linalg.svd`` (reduced matrices)."""
    u, s, vh = torch.linalg.svd(w.to(_compute_dtype(w)), full_matrices=False)
    return Triplets(u[:, :rank], s[:rank], vh[:rank].T)


def randomized_svd(w: Tensor, rank: int, tol: float = 1e-4, max_iter: int = 8, oversample: int | None = None, seed: int = 0) -> tuple[Triplets, bool]:
    """Seeded randomized SVD (range finder + power iterations) and whether it converged.

    After each power iteration the energy captured by the leading ``rank`` Ritz values,
    ``sum s_i^2``, is compared with the previous one; it rises monotonically towards the optimum
    (the exact rank-``rank`` energy), and we stop once the relative gain is below ``tol``.
    ``converged`` is False when ``max_iter`` iterations were not enough.
    """
    a = w.to(_compute_dtype(w))
    m, n = a.shape
    q = min(m, n, rank + (oversample if oversample is not None else max(10, rank // 10)))
    gen = torch.Generator(device=a.device).manual_seed(seed)
    basis = torch.linalg.qr(a @ torch.randn(n, q, generator=gen, dtype=a.dtype, device=a.device)).Q
    previous = None
    for iteration in range(max_iter + 1):
        bt = a.T @ basis  # (basis^T a)^T: the projected matrix, reused by the next power iteration
        energy = float(torch.linalg.svdvals(bt)[:rank].square().sum())
        converged = previous is not None and energy - previous <= tol * energy
        if converged or iteration == max_iter:
            break
        previous = energy
        basis = torch.linalg.qr(a @ torch.linalg.qr(bt).Q).Q
    ub, s, vh = torch.linalg.svd(bt.T, full_matrices=False)
    return Triplets((basis @ ub)[:, :rank], s[:rank], vh[:rank].T), converged


def triplet_residual(w: Tensor, t: Triplets) -> float:
    """Largest ``||A v_i - s_i u_i||`` relative to ``s_1`` (0 for an exact SVD)."""
    a = w.to(t.u.dtype)
    scale = float(t.s[0]) if t.s.numel() and float(t.s[0]) > 0 else 1.0
    return float(torch.linalg.vector_norm(a @ t.v - t.u * t.s, dim=0).max()) / scale


def _prefer_randomized(m: int, n: int, rank: int) -> bool:
    # below a few hundred rows LAPACK's full SVD is already fast and exact
    return min(m, n) >= 256 and rank <= min(m, n) // 4


def top_svd(w: Tensor, rank: int, method: SvdMethod = "auto", tol: float = 1e-4) -> Triplets:
    """Leading ``rank`` singular triplets of the 2-D matrix ``w`` in float32 (float64 stays float64).

    ``method="auto"`` uses the randomized SVD when ``rank`` is small relative to ``min(m, n)``
    and keeps it only if its captured energy converged (relative gain per power iteration below
    ``tol``), else computes the full SVD; ``"randomized"`` keeps the last iterate regardless.
    Singular directions with numerically zero singular value are arbitrary in any SVD; they are
    zeroed here so the result (and a router built from it) is reproducible.
    """
    if w.ndim != 2:
        raise ValueError(f"top_svd expects a 2-D matrix, got shape {tuple(w.shape)}")
    m, n = w.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}")
    if method not in ("auto", "full", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}; expected 'auto', 'full' or 'randomized'")
    if method == "full" or (method == "auto" and not _prefer_randomized(m, n, rank)):
        t = full_svd(w, rank)
    else:
        t, converged = randomized_svd(w, rank, tol)
        if method == "auto" and not converged:
            t = full_svd(w, rank)
    return _zero_null_directions(t, max(m, n))


def _zero_null_directions(t: Triplets, size: int) -> Triplets:
    if not t.s.numel():
        return t
    cutoff = size * torch.finfo(t.s.dtype).eps * t.s[0]
    keep = (t.s > cutoff).to(t.s.dtype)
    return Triplets(t.u * keep, t.s * keep, t.v * keep)
