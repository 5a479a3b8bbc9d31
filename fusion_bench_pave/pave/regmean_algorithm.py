"""RegMean from a statistics directory (method=pave_statistics): FusionBench's RegMean with the
Gram matrices read instead of collected, so it needs no data and, nested in PAVE with the same
directory, reuses the statistics PAVE purified with."""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from fusion_bench_pave import plugin  # noqa: F401,I001  (compat repair before fusion_bench imports)
from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
from fusion_bench_pave.arguments import constructor_arguments, check_argument_types, reject_unknown_keys
from fusion_bench_pave.pave.purification import purifiable_layers
from fusion_bench_pave.pave.regmean import regmean_weight
from fusion_bench_pave.pave.task_statistics import StoredStatistics


@auto_register_config
class RegMeanFromStatistics(BaseAlgorithm):
    """FusionBench's RegMeanAlgorithm (same keys, same result) over Gram matrices X^T X / N from a
    statistics directory: every Linear weight with statistics in every model is merged by RegMean,
    every other parameter averaged. Statistics of other models are refused before any merging."""

    #: PAVE may nest it: it merges the purified weights it is given (as FusionBench's RegMean would)
    merges_task_vectors = True

    def __init__(
        self,
        statistics: str,
        reduce_non_diagonal_ratio: float = 0.95,
        exclude_param_names_regex: Optional[list[str]] = None,
        **kwargs: Any,
    ):
        """
        Args:
            statistics: directory written by method=pave_statistics on this pool's models; collect
                it with exclude_modules=[] so every Linear has statistics, as in FusionBench's RegMean.
            reduce_non_diagonal_ratio: scale of the Gram matrices' off-diagonal entries (FusionBench's
                key and default for CLIP).
            exclude_param_names_regex: parameters (state-dict names, re.match) left out of the merge:
                they keep the pretrained values.
            kwargs: only Hydra/FusionBench keys (``_target_``, ...); any other key is a TypeError.
        """
        reject_unknown_keys(type(self), kwargs)
        super().__init__(**kwargs)

    def excluded(self, name: str) -> bool:
        return any(re.match(pattern, name) for pattern in self.exclude_param_names_regex or [])

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        check_argument_types(type(self), constructor_arguments(self))
        if not 0 <= self.reduce_non_diagonal_ratio <= 1:
            raise ValueError(f"reduce_non_diagonal_ratio must be in [0, 1], got {self.reduce_non_diagonal_ratio}")
        tasks = list(modelpool.model_names)
        source = StoredStatistics(self.statistics, tasks)
        models = {task: modelpool.load_model(task) for task in tasks}
        source.check(models, lambda name, module: not self.excluded(f"{name}.weight"))
        stats = {task: source(task, model) for task, model in models.items()}
        try:
            merged = self.merge({task: model.state_dict() for task, model in models.items()}, stats)
        finally:
            for task_stats in stats.values():
                task_stats.xtx.close()
        model = modelpool.load_pretrained_model()
        model.load_state_dict(merged, strict=False)
        return model

    def merge(self, states: dict[str, dict[str, torch.Tensor]], stats: dict) -> dict[str, torch.Tensor]:
        """The merged state dict: RegMean for Linear weights with statistics in every model, the
        mean for every other parameter (as FusionBench's RegMean), excluded names left out."""
        layers = set(purifiable_layers(stats))
        merged = {}
        for name in next(iter(states.values())):
            if self.excluded(name):
                continue
            values = [state[name] for state in states.values()]
            layer = name.removesuffix(".weight")
            if name.endswith(".weight") and layer in layers:
                grams = [task_stats.covariance(layer) for task_stats in stats.values()]
                merged[name] = regmean_weight(values, grams, self.reduce_non_diagonal_ratio)
            else:
                merged[name] = torch.stack(values).mean(dim=0)
        return merged
