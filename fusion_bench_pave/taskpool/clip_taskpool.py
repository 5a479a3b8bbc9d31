"""FusionBench's CLIP vision task pool, usable with datasets FusionBench does not know."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fusion_bench.models.hf_clip import HFCLIPClassifier
from fusion_bench.tasks.clip_classification import CLIPTemplateFactory
from fusion_bench.taskpool import CLIPVisionModelTaskPool

from fusion_bench_pave.taskpool.task_modulation import for_task


class CLIPVisionTaskPool(CLIPVisionModelTaskPool):
    """``CLIPVisionModelTaskPool`` plus ``dataset_templates``: task name -> where its class names
    and prompt templates live (``{module, classnames, templates}``, FusionBench's own format),
    and evaluation of task-modulated models (EMR-Merging) with each task's modulation.

    FusionBench looks class names up by task name in a fixed table whose ``register_dataset`` is
    broken in 0.2.33, so the entries are written into the table directly.
    """

    def __init__(self, *args, dataset_templates: DictConfig | dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        for task, info in (dataset_templates or {}).items():
            CLIPTemplateFactory._dataset_mapping[task] = dict(info)

    def on_task_evaluation_begin(self, classifier: HFCLIPClassifier, task_name: str):
        for_task(classifier.clip_model.vision_model, task_name)
        super().on_task_evaluation_begin(classifier, task_name)
