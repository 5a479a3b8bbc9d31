"""Evaluate task-modulated models (FusionBench's ``ModulatedModel``, e.g. EMR-Merging's output)
task by task: switch the model to the task being evaluated before scoring it.

FusionBench 0.2.33's task pools never call ``set_task``, so EMR-Merging models fail there with
"No task specified"; ours do it for every task.
"""

from __future__ import annotations

from torch import nn


def for_task(model: nn.Module, task: str) -> nn.Module:
    """The module that computes ``task``. A model with ``set_task`` (FusionBench's
    ``ModulatedModel`` or any look-alike) is switched to ``task`` first; a ``ModulatedModel``
    applies the modulation to its ``backbone`` in place, so the backbone is returned. Any other
    model is returned unchanged."""
    if hasattr(model, "set_task"):
        model.set_task(task)
        return getattr(model, "backbone", model)
    return model
