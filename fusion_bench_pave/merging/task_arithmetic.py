"""Task Arithmetic on one tensor: theta_pre + lambda * sum_t tau_t."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def task_vectors(pretrained: Tensor, finetuned: Sequence[Tensor]) -> list[Tensor]:
    """tau_t = theta_t - theta_pre for every fine-tuned tensor."""
    return [tensor - pretrained for tensor in finetuned]


def task_arithmetic(pretrained: Tensor, vectors: Sequence[Tensor], scaling_factor: float) -> Tensor:
    """theta_pre + scaling_factor * (tau_1 + ... + tau_T), summed left to right as FusionBench's
    ``TaskArithmeticAlgorithm`` does (same ops in the same order: bit-equal to it)."""
    if not vectors:
        raise ValueError("Task Arithmetic needs at least one task vector")
    total = vectors[0]
    for vector in vectors[1:]:
        total = total + vector
    return pretrained + scaling_factor * total
