"""RegMean (Jin et al., ICLR 2023) of one Linear layer from its input Gram matrices (torch only).

Each model i contributes W_i and the Gram matrix G_i = X_i^T X_i / N_i of its layer's inputs (the
uncentred covariance PAVE collects). The merged weight minimises sum_i ||X_i W^T - X_i W_i^T||^2:
W^T = (sum_i G_i)^-1 sum_i G_i W_i^T, with the off-diagonal entries of every G_i scaled by
`reduce_non_diagonal_ratio` first (1 keeps them; 0 leaves the diagonal, i.e. a weighted average).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def reduce_off_diagonal(gram: Tensor, ratio: float) -> Tensor:
    """ratio * G + (1 - ratio) * diag(G): the off-diagonal entries of G scaled by `ratio`."""
    return ratio * gram + (1 - ratio) * torch.diag_embed(gram.diagonal())


@torch.no_grad()
def regmean_weight(weights: Sequence[Tensor], grams: Sequence[Tensor], ratio: float) -> Tensor:
    """The RegMean merge of Linear weights [out, in] with their input Gram matrices [in, in],
    computed in the Gram matrices' dtype and returned in the weights' dtype."""
    reduced = [reduce_off_diagonal(gram, ratio) for gram in grams]
    rhs = sum(gram @ weight.to(gram.dtype).T for gram, weight in zip(reduced, weights))
    return torch.linalg.solve(sum(reduced), rhs).T.to(weights[0].dtype)
