"""FusionBench merger configs (``_target_`` + keys) as the streamed merges of ``merging.stream``, which
give the same merged weights (tests/test_causal_lm_merge.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from fusion_bench.utils.instantiate_utils import instantiate
from fusion_bench.utils.packages import import_object

from fusion_bench_pave.merging.stream import Dare, TaskArithmetic, Ties

FB = "fusion_bench.method."
STREAMED_MERGERS = {  # qualified class name -> (streamed merge, with DARE's drop)
    FB + "task_arithmetic.task_arithmetic.TaskArithmeticAlgorithm": ("ta", False),
    FB + "ties_merging.ties_merging.TiesMergingAlgorithm": ("ties", False),
    FB + "dare.task_arithmetic.DareTaskArithmetic": ("ta", True),
    FB + "dare.ties_merging.DareTiesMerging": ("ties", True),
}


def streamed_merger(config: Mapping[str, Any], seed: int) -> tuple[TaskArithmetic | Ties, Optional[Dare]]:
    """The streamed merge of a FusionBench merger config, and its DARE drop (seeded with ``seed``: the
    masks FusionBench draws after ``torch.manual_seed(seed)``) if it has one. ValueError for any other
    merger or for TIES ``remove_keys``, which the streamed merge does not offer."""
    target = str(config.get("_target_", ""))
    try:
        cls = import_object(target)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"merger._target_={target!r} cannot be imported ({error})") from error
    kind = next((STREAMED_MERGERS[f"{c.__module__}.{c.__qualname__}"] for c in getattr(cls, "__mro__", ())
                 if f"{c.__module__}.{c.__qualname__}" in STREAMED_MERGERS), None)
    if kind is None:
        names = ", ".join(name.removeprefix(FB) for name in STREAMED_MERGERS)
        raise ValueError(f"merger._target_={target!r}: the streamed merge offers {names} (fusion_bench.method.*)")
    merger = instantiate(dict(config))  # FusionBench's own defaults for the keys the config leaves out
    if kind[0] == "ties" and merger.remove_keys:
        raise ValueError(f"merger.remove_keys={list(merger.remove_keys)}: the streamed merge merges every tensor; use []")
    method = TaskArithmetic(merger.scaling_factor) if kind[0] == "ta" else Ties(merger.scaling_factor, merger.threshold, merger.merge_func)
    dare = Dare(merger.sparsity_ratio, merger.rescale, merger.only_on_linear_weights, seed) if kind[1] else None
    return method, dare
