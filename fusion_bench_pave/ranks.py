"""Collectives of a Lightning Fabric run that every rank calls at the same point (None: one process).

Used where ranks share work: each rank learns whether another failed, instead of waiting forever
for a rank that has raised.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

K = TypeVar("K", bound=Hashable)


def rank_and_size(fabric: Any | None) -> tuple[int, int]:
    """(global rank, world size); (0, 1) without a Fabric."""
    return (0, 1) if fabric is None else (fabric.global_rank, fabric.world_size)


def sum_over_ranks(fabric: Any | None, value: int) -> int:
    """The sum of the integer ``value`` over all ranks."""
    if rank_and_size(fabric)[1] == 1:
        return value
    return int(fabric.all_reduce(torch.tensor(value, dtype=torch.long, device=fabric.device), reduce_op="sum").item())


def gather(fabric: Any | None, value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order."""
    rank, world_size = rank_and_size(fabric)
    return [value] if world_size == 1 else [fabric.broadcast(value if src == rank else None, src=src) for src in range(world_size)]


def checked_sum(fabric: Any | None, compute: Callable[[], Tensor], what: str) -> Tensor:
    """``compute()`` on every rank, summed over the ranks (exact for integer tensors; summed on the
    fabric's device, returned on the value's); if it failed on any rank, every rank raises
    (``raise_if_any_failed``) instead of waiting in the sum."""
    value, error = None, None
    try:
        value = compute()
    except Exception as caught:  # noqa: BLE001 (told to every rank below)
        error = caught
    raise_if_any_failed(fabric, error, what)
    if rank_and_size(fabric)[1] == 1:
        return value
    return fabric.all_reduce(value.to(fabric.device, copy=True), reduce_op="sum").to(value.device)


def balance(costs: Mapping[K, float], world_size: int) -> dict[K, int]:
    """Deal work items to ranks, largest first to the least loaded rank (ties: the lower rank, then
    the earlier item): item -> rank. Every rank computes the same dealing from the same costs."""
    loads = [0.0] * world_size
    owner: dict[K, int] = {}
    for item in sorted(costs, key=lambda item: -costs[item]):  # stable: equal costs keep their order
        owner[item] = min(range(world_size), key=lambda rank: loads[rank])
        loads[owner[item]] += costs[item]
    return {item: owner[item] for item in costs}


def raise_if_any_failed(fabric: Any | None, error: BaseException | None, what: str) -> None:
    """Every rank tells the others whether ``what`` failed on it: a rank that failed raises its own
    ``error``, the others a ``RuntimeError`` naming the failed ranks and their errors."""
    rank, world_size = rank_and_size(fabric)
    if world_size > 1:
        mine = None if error is None else f"{type(error).__name__}: {error}"
        reports = [fabric.broadcast(mine if src == rank else None, src=src) for src in range(world_size)]
    if error is not None:
        raise error
    if world_size > 1 and (failed := {src: report for src, report in enumerate(reports) if report is not None}):
        raise RuntimeError(f"{what} failed on rank(s) {sorted(failed)}: " + "; ".join(f"rank {src}: {report}" for src, report in failed.items()))
