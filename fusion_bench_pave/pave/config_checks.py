"""Reject bad PAVE hyperparameters before any model is loaded or statistic collected, so a typo
fails in a second with the valid range instead of after minutes of covariance collection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

from fusion_bench.utils.packages import import_object

from fusion_bench_pave.pave.offload import Offload
from fusion_bench_pave.pave.rank_allocation import Allocation
from fusion_bench_pave.pave.regularize import Regularization


def check_merger(merger: Any) -> None:
    """The nested merger config names an importable class with a ``run`` method."""
    if not isinstance(merger, Mapping) and callable(getattr(merger, "run", None)):
        raise ValueError(
            f"merger must be a config with `_target_`, got an instantiated {type(merger).__name__}; "
            "instantiate PAVE with _recursive_=false (as fusion_bench does) so PAVE builds the merger itself"
        )
    target = merger.get("_target_") if isinstance(merger, Mapping) else None
    if not target:
        raise ValueError(f"merger needs a `_target_` (e.g. fusion_bench.method.TiesMergingAlgorithm), got {merger!r}")
    try:
        merger_class = import_object(str(target))
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"merger._target_={target!r} cannot be imported ({error}); use a FusionBench merging class "
            "such as fusion_bench.method.TiesMergingAlgorithm"
        ) from error
    if not callable(getattr(merger_class, "run", None)):
        raise ValueError(f"merger._target_={target!r} has no run(modelpool) method; it is not a merging algorithm")


def check_hyperparameters(algorithm: Any, dtypes: Mapping[str, Any]) -> None:
    """Ranges and choices of a ``PAVE`` instance's settings, and its merger."""
    if not 0 < algorithm.rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {algorithm.rho}; rho=1 keeps every component.")
    for name in ("num_samples", "batch_size", "max_length"):
        if getattr(algorithm, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(algorithm, name)}")
    if algorithm.num_rows is not None and algorithm.num_rows < 1:
        raise ValueError(f"num_rows must be >= 1 or null, got {algorithm.num_rows}")
    choices = {
        "allocation": get_args(Allocation),
        "regularization": get_args(Regularization),
        "accumulate_dtype": tuple(dtypes),
        "covariance_offload": get_args(Offload),
    }
    for name, allowed in choices.items():
        if getattr(algorithm, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(algorithm, name)!r}")
    if algorithm.dare and not 0 <= float(algorithm.dare["sparsity_ratio"]) < 1:
        raise ValueError(f"dare.sparsity_ratio must be in [0, 1), got {algorithm.dare['sparsity_ratio']}")
    check_merger(algorithm.merger)
