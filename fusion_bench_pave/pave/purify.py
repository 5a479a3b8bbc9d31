"""Context-oriented SVD and purification of one Linear weight.

W_ft @ C_eps = U S V^T. Keeping the top r components gives W_tilde = U_r S_r V_r^T C_eps^-1, which is
exactly the orthogonal projection U_r U_r^T W_ft; we use that inverse-free form.

`context_eigh` gets U and S from a symmetric eigendecomposition of the smaller Gram matrix of
W C_eps instead of an SVD (3-10x cheaper on CPU), and only the trailing columns of U that a caller
can drop. Its S_i carry an absolute error of about
1e-16 * S_1^2 / S_i relative to S_i, far below the float32 rounding of the official procedure.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusion_bench_pave.pave.covariance import add_gram_

GRAM_BLOCK = 128  # rows per block of the Gram's lower triangle (about 60% of a full GEMM's time at 768)


def context_svd(weight: Tensor, cov_eps: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors U [out, R] and singular values S [R] of W @ C_eps, in float64."""
    product = weight.to(torch.float64) @ cov_eps.to(torch.float64)
    u, s, _ = torch.linalg.svd(product, full_matrices=False)
    return u, s


def context_eigh(weight: Tensor, cov_eps: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
    """U[:, start:] [out, R - start] and all of S [R] (descending) of M = W @ C_eps in float64, from
    eigh of the lower triangle of M M^T (out <= in) or M^T M (U = M V / S, formed for the requested
    columns only; columns with S = 0 are zero). With start=0, the contract of `context_svd`."""
    product = weight.to(torch.float64) @ cov_eps.to(torch.float64)
    wide = product.shape[0] <= product.shape[1]
    size = min(product.shape)
    gram = product.new_zeros(size, size)
    add_gram_(gram, product.T if wide else product, GRAM_BLOCK)  # eigh reads the lower triangle only
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors[:, : size - start].flip(1)
    s = values.clamp_min(0).sqrt()
    if wide:
        return vectors, s
    tail = s[start:]
    scale = torch.where(tail > 0, 1 / tail, torch.zeros_like(tail))
    return (product @ vectors) * scale, s


def project_weight(weight: Tensor, u: Tensor, rank: int) -> Tensor:
    """W_tilde = U_r U_r^T W in W's dtype; at full rank W itself is returned unchanged (bit-exact)."""
    if rank >= u.shape[1]:
        return weight
    u_r = u[:, :rank]
    w = weight.to(u.dtype)
    return (u_r @ (u_r.T @ w)).to(weight.dtype)


def remove_subspace(weight: Tensor, u_dropped: Tensor, pretrained: Optional[Tensor] = None) -> Tensor:
    """W - U_d U_d^T (W - W_pre) in W's dtype (W_pre = 0 if not given). Without `pretrained`: the
    projection U_r U_r^T W onto the kept components when U spans W's column space (U from
    `context_eigh`/`context_svd`, C_eps invertible), the paper's tau_tilde = U_r U_r^T W_ft - W_pre.
    With it: W_pre + tau - U_d U_d^T tau, i.e. tau_tilde = U_r U_r^T tau whenever U spans R^out
    (out <= in and W C_eps of full row rank); a part of tau outside the span of U is kept, so
    nothing changes at full rank. W itself if U_d has no column."""
    if u_dropped.shape[1] == 0:
        return weight
    w = weight.to(u_dropped.dtype)
    delta = w if pretrained is None else w - pretrained.to(u_dropped.dtype)
    return (w - u_dropped @ (u_dropped.T @ delta)).to(weight.dtype)


def purify_weight(weight: Tensor, cov_eps: Tensor, rank: int) -> Tensor:
    """Purified weight of one Linear at a given rank (projection form)."""
    u, _ = context_svd(weight, cov_eps)
    return project_weight(weight, u, rank)
