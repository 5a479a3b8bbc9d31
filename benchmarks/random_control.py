"""Diagnostic (b) of issue 18: a control that removes random components with the same C-weighted energy
as PAVE removes, so that "PAVE removed something useful" can be told apart from "removing anything of
that size changes the merge by this much".

PAVE removes dW = U_d U_d^T W_ft from a layer (d = R - r context components). The control removes, from
the same fine-tuned weight, the projection onto a random (Haar) subspace of the same dimension d in
R^out, rescaled so that its energy on the task's calibration inputs, ||dW C^{1/2}||_F^2 = tr(dW C dW^T)
(the mean squared change of the layer's output), equals PAVE's. `RandomControlPAVE` is PAVE with that
replacement after each purification (the same statistics, ranks and merger), for ``benchmarks.reproduce``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor, nn

from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.covariance import CovarianceStats
from fusion_bench_pave.pave.models import LinearWeights


def output_energy(delta: Tensor, cov: Tensor) -> float:
    """tr(dW C dW^T) = ||dW C^{1/2}||_F^2 in float64: the mean squared output change over the inputs of C."""
    d = delta.to(torch.float64)
    return float(((d @ cov.to(torch.float64)) * d).sum())


def random_removal(weight: Tensor, removed: Tensor, cov: Tensor, dim: int, generator: torch.Generator) -> Tensor:
    """W - g Q Q^T W with Q a random orthonormal [out, dim] basis (QR of a seeded Gaussian) and g >= 0
    chosen so that tr((g Q Q^T W) C (g Q Q^T W)^T) equals output_energy(removed, cov); W's dtype. W itself
    if dim is 0 or PAVE removed nothing; ValueError if the random part has no energy to scale."""
    target = output_energy(removed, cov)
    if dim == 0 or target == 0:
        return weight
    w = weight.to(torch.float64)
    gaussian = torch.randn(w.shape[0], dim, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    part = q @ (q.T @ w)
    energy = output_energy(part, cov)
    if energy <= 0:
        raise ValueError("the random subspace carries no energy on these inputs; cannot match PAVE's")
    return (w - (target / energy) ** 0.5 * part).to(weight.dtype)


class RandomControlPAVE(PAVE):
    """PAVE whose purified weights are replaced by `random_removal` of the same fine-tuned weights:
    per (task, layer) the dimension PAVE dropped and the energy, on the task's C, of what it removed.
    The random bases are drawn from `seed` (one generator per run, tasks and layers in pool order)."""

    def purify_(
        self, finetuned: Mapping[str, nn.Module], stats: Mapping[str, CovarianceStats], pretrained: nn.Module,
        pretrained_statistics: Optional[Mapping[str, CovarianceStats]] = None,
    ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        originals = {task: {layer: w.clone() for layer, w in LinearWeights(model, self.purify_attention).items()}
                     for task, model in finetuned.items()}
        ranks, full_ranks = super().purify_(finetuned, stats, pretrained, pretrained_statistics)
        generator = torch.Generator().manual_seed(self.seed)
        for task, model in finetuned.items():
            weights = LinearWeights(model, self.purify_attention)
            for layer, rank in ranks[task].items():
                original = originals[task][layer]
                controlled = random_removal(original, original - weights[layer], stats[task].covariance(layer),
                                            full_ranks[layer] - rank, generator)
                weights.write(layer, controlled)
        return ranks, full_ranks
