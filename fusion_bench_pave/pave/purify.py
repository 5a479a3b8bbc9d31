"""Context-oriented SVD and purification of one Linear weight.

W_ft @ C_eps = U S V^T. Keeping the top r components gives W_tilde = U_r S_r V_r^T C_eps^-1, which is
exactly the orthogonal projection U_r U_r^T W_ft; we use that inverse-free form.
"""

from __future__ import annotations

import torch
from torch import Tensor


def context_svd(weight: Tensor, cov_eps: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors U [out, R] and singular values S [R] of W @ C_eps, in float64."""
    product = weight.to(torch.float64) @ cov_eps.to(torch.float64)
    u, s, _ = torch.linalg.svd(product, full_matrices=False)
    return u, s


def context_singular_values(weight: Tensor, cov_eps: Tensor) -> Tensor:
    """Singular values of W @ C_eps only (cheaper than the full SVD; for rank allocation)."""
    return torch.linalg.svdvals(weight.to(torch.float64) @ cov_eps.to(torch.float64))


def project_weight(weight: Tensor, u: Tensor, rank: int) -> Tensor:
    """W_tilde = U_r U_r^T W in W's dtype; at full rank W itself is returned unchanged (bit-exact)."""
    if rank >= u.shape[1]:
        return weight
    u_r = u[:, :rank]
    w = weight.to(u.dtype)
    return (u_r @ (u_r.T @ w)).to(weight.dtype)


def purify_weight(weight: Tensor, cov_eps: Tensor, rank: int) -> Tensor:
    """Purified weight of one Linear at a given rank (projection form)."""
    u, _ = context_svd(weight, cov_eps)
    return project_weight(weight, u, rank)
