"""The FusionBench report our text task pools return: model info, one score dict per task, average."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Callable

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fusion_bench.utils import count_parameters, instantiate

from fusion_bench_pave.taskpool.task_modulation import for_task

log = logging.getLogger(__name__)


def accuracy_and_loss(batches: Iterable[tuple[Tensor, Tensor]], task: str) -> dict[str, float]:
    """Accuracy and mean cross-entropy (in float32 or wider) over ``(logits, targets)`` batches."""
    correct, loss_sum, n = 0, 0.0, 0
    for logits, targets in batches:
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        n += len(targets)
    if n == 0:
        raise ValueError(f"test dataset of task {task!r} is empty")
    return {"accuracy": correct / n, "loss": loss_sum / n}


def evaluate_tasks(
    model: nn.Module,
    datasets: DictConfig | dict[str, Any],
    score: Callable[[nn.Module, str, Any], dict[str, float]],
    name: str | None = None,
) -> dict[str, Any]:
    """``score(module, task, dataset) -> {metric: value}`` for every task, each with the module that
    computes it (``for_task``), plus ``model_info`` and the task average of every metric all tasks
    report, as FusionBench's CLIP task pool reports them."""
    if not datasets:
        raise ValueError("the task pool has no test datasets; set `test_datasets` in the taskpool config")
    trainable, total = count_parameters(model)
    report: dict[str, Any] = {"model_info": {"trainable_params": trainable, "all_params": total}}
    if name is not None:
        report["model_info"]["name"] = name
    for task, dataset in datasets.items():
        if isinstance(dataset, (dict, DictConfig)):
            dataset = instantiate(dataset)
        if len(dataset) == 0:
            raise ValueError(f"task '{task}': its test dataset is empty (0 rows); nothing to evaluate")
        report[task] = score(for_task(model, task), task, dataset)
        log.info(f"{task}: {report[task]}")
    tasks = [v for k, v in report.items() if k != "model_info"]
    common = [key for key in tasks[0] if all(key in t for t in tasks)]
    report["average"] = {key: sum(t[key] for t in tasks) / len(tasks) for key in common}
    return report
