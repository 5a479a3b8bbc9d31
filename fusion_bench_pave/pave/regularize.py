"""Make a covariance invertible: C_eps = C + eps * I, eps chosen by the official doubling rule or
relative to the mean diagonal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

Regularization = Literal["doubling", "relative"]


def add_identity(cov: Tensor, eps: float) -> Tensor:
    """C + eps * I (the same bits every call, so C_eps can be rebuilt from C and eps instead of kept)."""
    reg = cov.clone()
    reg.diagonal().add_(eps)
    return reg


PROBES = 32  # seeded Gaussian probes of the inverse-residual estimate
GUARD = 4.0  # the estimate decides only when it is more than GUARD times away from tol


def _finite(inv: Tensor) -> bool:
    """Whether every entry is finite, read from their sum (one pass, no mask). A sum that overflows
    although every entry is finite says False; such an inverse fails the check anyway (its residual
    is far above any tol), so the verdict is the same."""
    return bool(torch.isfinite(inv.sum()))


def _residual(inv: Tensor, low: Tensor) -> float:
    """||inv @ low - I||_F (one n^3 product)."""
    return float(torch.linalg.matrix_norm(inv @ low - torch.eye(low.shape[0], dtype=low.dtype, device=low.device)))


def inverse_residual(low: Tensor) -> float:
    """||A^-1 A - I||_F with A^-1 an explicit inverse in A's dtype (inf if not finite)."""
    inv = torch.linalg.inv(low)
    return _residual(inv, low) if _finite(inv) else float("inf")


def inverse_check(low: Tensor, tol: float, probes: int = PROBES, seed: int = 0) -> bool:
    """||A^-1 A - I||_F < tol for the explicit inverse A^-1 (as `inverse_residual`): `inverse_checks`
    of one matrix."""
    return inverse_checks([low], tol, probes, seed)


def inverse_checks(lows: Sequence[Tensor], tol: float, probes: int = PROBES, seed: int = 0) -> bool:
    """sum_k ||A_k^-1 A_k - I||_F < tol for explicit inverses A_k^-1 (as `inverse_residual`; the
    official second pass sums the fine-tuned and the pretrained covariance's residuals), deciding
    from the sum of the unbiased estimates ||(A_k^-1 A_k - I) Z||_F / sqrt(probes) (seeded Gaussian Z,
    O(n^2 probes)) when it is more than GUARD times away from tol, and from the exact norms (one n^3
    product each) otherwise. Each squared estimate has a relative spread of at most
    sqrt(2 / probes) = 25%; contradicting the exact check needs one off by GUARD^2 = 16x (a sum of
    norms each within GUARD of its own is within GUARD of theirs), which even for a rank-one residual
    (the worst case, chi-square with `probes` degrees of freedom) has probability below 2e-14, and
    the probes are seeded, so given covariances always get the same verdict."""
    inverses = [torch.linalg.inv(low) for low in lows]
    if not all(_finite(inv) for inv in inverses):
        return False
    estimate = 0.0
    for inv, low in zip(inverses, lows):
        # probes drawn on the CPU, so every device sees the same Z for the same covariance
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(low.shape[0], probes, generator=generator, dtype=low.dtype).to(low.device)
        estimate += float(torch.linalg.matrix_norm(inv @ (low @ z) - z)) / probes**0.5
    if estimate < tol / GUARD:
        return True
    if estimate > tol * GUARD:
        return False
    return sum(_residual(inv, low) for inv, low in zip(inverses, lows)) < tol


def regularize_doubling(
    cov: Tensor,
    eps0: float = 0.1,
    tol: float = 5e-2,
    max_doublings: int = 64,
    check_dtype: torch.dtype = torch.float32,
    also: Sequence[Tensor] = (),
) -> tuple[Tensor, float]:
    """Official rule: start at eps0 and double until ||C_eps^-1 C_eps - I||_F < tol; with `also`
    (the official second pass: the pretrained model's C on the same inputs) until the sum of that
    norm and each further covariance's own, at the same eps, is below tol.

    The check runs in `check_dtype` (float32, like the official GPU code); in float64 it would
    accept almost any eps. `inverse_checks` skips the n^3 check products unless the norm is within
    a factor GUARD of tol (at MiniLM/ViT widths it is 100-1000x below tol at eps0).
    """
    eps = eps0
    for _ in range(max_doublings):
        reg = add_identity(cov, eps)
        if inverse_checks([reg.to(check_dtype)] + [add_identity(c, eps).to(check_dtype) for c in also], tol):
            return reg, eps
        eps *= 2.0
    raise ValueError(
        f"doubling regularisation did not reach ||C^-1 C - I|| < {tol} after {max_doublings} "
        f"doublings from eps0={eps0} (eps={eps}); the covariance is ill-scaled or non-finite."
    )


def regularize_relative(cov: Tensor, alpha: float = 1e-3) -> tuple[Tensor, float]:
    """Cheap rule: eps = alpha * mean(diag C) (alpha itself if the diagonal is all zero)."""
    scale = float(cov.diagonal().mean())
    eps = alpha * scale if scale > 0 else alpha
    return add_identity(cov, eps), eps


def regularize(
    cov: Tensor, rule: Regularization, eps0: float, tol: float, alpha: float, also: Sequence[Tensor] = ()
) -> tuple[Tensor, float]:
    """C_eps and eps by ``rule``: "doubling" (from eps0 until the check passes at tol, on `cov` and
    the covariances `also`, summed: `regularize_doubling`) or "relative" (alpha times the mean
    diagonal; `also` is refused); each rule ignores the other's settings."""
    if rule == "doubling":
        return regularize_doubling(cov, eps0, tol, also=also)
    if rule == "relative":
        if also:
            raise ValueError("covariances checked together (eps_check_pretrained) need regularization=doubling")
        return regularize_relative(cov, alpha)
    raise ValueError(f"regularization must be one of {', '.join(get_args(Regularization))}; got {rule!r}")
