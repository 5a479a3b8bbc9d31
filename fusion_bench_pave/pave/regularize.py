"""Make a covariance invertible: C_eps = C + eps * I, eps chosen by the official doubling rule or
relative to the mean diagonal."""

from __future__ import annotations

import torch
from torch import Tensor


def add_identity(cov: Tensor, eps: float) -> Tensor:
    """C + eps * I (the same bits every call, so C_eps can be rebuilt from C and eps instead of kept)."""
    return cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def regularize_doubling(
    cov: Tensor,
    eps0: float = 0.1,
    tol: float = 5e-2,
    max_doublings: int = 64,
    check_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, float]:
    """Official rule: start at eps0 and double until ||C_eps^-1 C_eps - I||_F < tol.

    The check runs in `check_dtype` (float32, like the official GPU code); in float64 it would
    accept almost any eps.
    """
    eye = torch.eye(cov.shape[0], dtype=check_dtype, device=cov.device)
    eps = eps0
    for _ in range(max_doublings):
        reg = add_identity(cov, eps)
        low = reg.to(check_dtype)
        inv = torch.linalg.inv(low)
        if torch.isfinite(inv).all() and torch.linalg.matrix_norm(inv @ low - eye) < tol:
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
