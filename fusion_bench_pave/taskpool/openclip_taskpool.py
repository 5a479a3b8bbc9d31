"""FusionBench's open_clip task pool, able to score task-modulated models (EMR-Merging) too."""

from __future__ import annotations

from typing import Any

from torch import nn

from fusion_bench.taskpool import OpenCLIPVisionModelTaskPool

from fusion_bench_pave.taskpool.task_modulation import for_task


class OpenCLIPVisionTaskPool(OpenCLIPVisionModelTaskPool):
    """``OpenCLIPVisionModelTaskPool`` that switches a task-modulated encoder (EMR-Merging's
    ``ModulatedModel``) to each task before scoring it with that task's classification head;
    FusionBench 0.2.33's pool never does, so EMR fails there ("No task specified", and before that
    its ImageClassifier reads preprocess attributes that only the wrapped encoder has)."""

    def evaluate(self, model: nn.Module, **kwargs: Any) -> dict:
        backbone = getattr(model, "backbone", None)
        if hasattr(model, "set_task") and backbone is not None:
            for name in ("train_preprocess", "val_preprocess"):  # read by ImageClassifier's constructor
                if not hasattr(model, name) and hasattr(backbone, name):
                    object.__setattr__(model, name, getattr(backbone, name))
        return super().evaluate(model, **kwargs)

    def _evaluate(self, classifier: Any, test_loader: Any, num_classes: int, task_name: str) -> dict[str, float]:
        for_task(classifier.image_encoder, task_name)
        return super()._evaluate(classifier, test_loader, num_classes, task_name)
