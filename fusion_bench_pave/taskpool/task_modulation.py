"""Evaluate task-modulated models (FusionBench's ``ModulatedModel``, e.g. EMR-Merging's output)
task by task: switch the model to the task being evaluated before scoring it.

FusionBench 0.2.33's task pools never call ``set_task``, so EMR-Merging models fail there with
"No task specified"; ours do it for every task.
"""

from __future__ import annotations

from torch import nn


def for_task(model: nn.Module, task: str) -> nn.Module:
    """The module that computes ``task``: a modulated model's backbone, switched to ``task``;
    any other model unchanged."""
    from fusion_bench.models.modulator.base import ModulatedModel

    if isinstance(model, ModulatedModel):
        model.set_task(task)
        return model.backbone
    return model
