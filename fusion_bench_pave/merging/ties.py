"""TIES-Merging of one tensor, given the whole-model quantities it depends on.

FusionBench's TIES keeps, for each task, the entries of its task vector whose magnitude reaches that
task's k-th smallest magnitude over the WHOLE model (``kth_magnitude`` finds it in a streaming pass),
elects a sign per entry (the sign of the trimmed sum; entries whose sum is exactly zero take the sign
of the sum of all elected signs over the whole model, ``sign_votes`` accumulates it), and merges the
entries that agree with the elected sign. Given those two whole-model quantities the rest is per entry.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

MergeFunc = Literal["sum", "mean", "max"]
MERGE_FUNCS = ("sum", "mean", "max")


def keep_fraction(threshold: float) -> float:
    """FusionBench's ``threshold``: the fraction of entries each task keeps, in percent if above 1."""
    return threshold / 100 if threshold > 1 else threshold


def trim_rank(numel: int, threshold: float) -> int:
    """The 1-based rank (ascending magnitude) of each task's trimming threshold among ``numel`` entries,
    as FusionBench's ``topk_values_mask`` computes it."""
    rank = numel - int(numel * keep_fraction(threshold))
    if not 1 <= rank <= numel:
        raise ValueError(f"TIES threshold {threshold} keeps {numel - rank} of {numel} entries; it must keep "
                         "fewer than all (0 < threshold < 1, or a percentage below 100)")
    return rank


def trim(vectors: Sequence[Tensor], thresholds: Tensor) -> Tensor:
    """Stack the task vectors ([T, ...]) with each zeroed where its magnitude is below its threshold
    (``thresholds``: [T], in the vectors' dtype)."""
    stacked = torch.stack(list(vectors))
    limits = thresholds.to(stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
    return stacked * (stacked.abs() >= limits)


def sign_votes(trimmed: Tensor) -> int:
    """This tensor's contribution to the whole-model sum of elected signs (an exact integer)."""
    signs = torch.sign(trimmed.sum(dim=0))
    return int((signs > 0).sum()) - int((signs < 0).sum())


def majority_sign(votes: int) -> int:
    """The sign given to entries whose trimmed sum is zero: that of the whole-model vote total."""
    return (votes > 0) - (votes < 0)


def elect_signs(trimmed: Tensor, majority: int) -> Tensor:
    """Sign of each entry's trimmed sum, ``majority`` where that sum is zero."""
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = majority
    return signs


def disjoint_merge(trimmed: Tensor, signs: Tensor, merge_func: MergeFunc) -> Tensor:
    """Aggregate the entries that agree with the elected sign: their sum, mean, or signed max magnitude."""
    agree = torch.where(signs.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    if merge_func == "sum":
        return selected.sum(dim=0)
    if merge_func == "mean":
        return selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    if merge_func == "max":
        return selected.abs().max(dim=0)[0] * signs
    raise ValueError(f"unknown TIES merge_func {merge_func!r}; choose one of {MERGE_FUNCS}")


def ties_merge(pretrained: Tensor, trimmed: Tensor, majority: int, scaling_factor: float,
               merge_func: MergeFunc = "sum") -> Tensor:
    """theta_pre + scaling_factor * (disjoint merge of the trimmed task vectors under the elected signs)."""
    return pretrained + scaling_factor * disjoint_merge(trimmed, elect_signs(trimmed, majority), merge_func)
