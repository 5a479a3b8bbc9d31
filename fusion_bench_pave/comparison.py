"""The comparison a merging run can end with: the method's model beside the pretrained model, the
individual fine-tuned models (each scored on its own task) and other methods run on the same model pool,
every row scored in the same run by the same task pool on the same test splits, one line per model.

The README demo (``fusion_bench +preset=pave_ties_zoo_minilm``) selects ``ComparisonProgram`` and
compares PAVE + TIES with TIES alone (``${method.merger}``). Every score is measured here; none is
read from an earlier run or from the zoo's build.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig
from torch import nn

from fusion_bench import BaseModelPool, BaseTaskPool
from fusion_bench.programs import FabricModelFusionProgram
from fusion_bench.utils.instantiate_utils import set_print_function_call_permeanent

log = logging.getLogger(__name__)

NON_TASK_KEYS = ("model_info", "average")
PRETRAINED_ROW, INDIVIDUAL_ROW = "pretrained", "individual (each on its own task)"
COMPARISON_KEYS = {"name", "pretrained", "individual", "baselines"}


class OwnTaskModels(nn.Module):
    """The fine-tuned models as one task-switched model: after ``set_task(t)``, which our task pools call
    before scoring task ``t`` (``taskpool.task_modulation.for_task``), it computes what ``t``'s own model does."""

    def __init__(self, models: Mapping[str, nn.Module]):
        super().__init__()
        self.models = nn.ModuleDict(dict(models))
        self.current_task: str | None = None

    def set_task(self, task: str) -> None:
        if task not in self.models:
            raise ValueError(f"no fine-tuned model for task {task!r}; the model pool has {list(self.models)}")
        self.current_task = task

    @property
    def backbone(self) -> nn.Module:
        """The current task's model: what ``for_task`` hands a task pool to score."""
        if self.current_task is None:
            raise AttributeError("backbone: no task set")
        return self.models[self.current_task]

    def forward(self, *args, **kwargs) -> Any:
        if self.current_task is None:
            raise RuntimeError(
                "the task pool never called set_task, so it cannot score each fine-tuned model on its own task; "
                "use a fusion_bench_pave task pool or set comparison.individual=false"
            )
        return self.backbone(*args, **kwargs)


def own_task_models(modelpool: BaseModelPool) -> OwnTaskModels:
    """Every fine-tuned model of the pool, each answering for its own task."""
    return OwnTaskModels({name: modelpool.load_model(name) for name in modelpool.model_names})


def method_evaluation(report: Mapping[str, Any]) -> Mapping[str, Any]:
    """The task pool's scores of the method's model: the report itself, or its ``model`` entry when the
    method returned ``{"model": ..., <extras>}`` (PAVE does)."""
    return report["model"] if "average" not in report and "model" in report else report


def comparison_table(rows: Mapping[str, Mapping[str, Any]], source: str) -> str:
    """One line per row (label -> task pool report): task-average and per-task accuracy in percent."""
    first = next(iter(rows.values()))
    tasks = [task for task in first if task not in NON_TASK_KEYS]
    columns = ["average", *tasks]
    widths = [max(len(c), 5) for c in columns]
    label_width = max(len(label) for label in rows)
    lines = [f"Accuracy (%) {source}:",
             " " * label_width + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    for label, report in rows.items():
        cells = [f"{100 * report[c]['accuracy']:.1f}".rjust(w) for c, w in zip(columns, widths)]
        lines.append(label.ljust(label_width) + "  " + "  ".join(cells))
    return "\n".join(lines)


class ComparisonProgram(FabricModelFusionProgram):
    """FusionBench's fusion program, then a comparison: the run's task pool also scores the pool's pretrained
    model, its fine-tuned models (each on its own task) and the model of every method in ``baselines``, run on
    the same model pool. The scores go into the report under ``comparison`` (label -> task pool report) and
    are printed last as a table, one line per model, the method's own model last.

    Args:
        comparison: ``name``: label of the method's row; ``pretrained`` / ``individual``: add those rows
            (default true); ``baselines``: label -> method config (e.g. ``${method.merger}``: PAVE's merger
            alone). The individual row needs a task pool that calls ``set_task`` (this package's do).
        print_function_call: false leaves out the box FusionBench prints for every object it instantiates
            (each model and dataset). Its own program ignores the key in 0.2.33: it assigns the value to
            the class attribute ``RuntimeConstants.print_function_call``, not to the flag it replaces.
        Every other argument: ``FabricModelFusionProgram``'s.
    """

    def __init__(self, *args, comparison: DictConfig | Mapping[str, Any] | None = None,
                 print_function_call: bool = True, **kwargs):
        comparison = dict(comparison or {})
        if unknown := set(comparison) - COMPARISON_KEYS:
            raise ValueError(f"unknown comparison key(s) {sorted(unknown)}; expected some of {sorted(COMPARISON_KEYS)}")
        for label, config in dict(comparison.get("baselines") or {}).items():
            if not isinstance(config, Mapping) or "_target_" not in config:
                raise ValueError(f"comparison.baselines.{label} must be a method config with a _target_")
        set_print_function_call_permeanent(print_function_call)
        super().__init__(*args, print_function_call=print_function_call, **kwargs)
        self.comparison = comparison
        self._compared = False

    def comparison_rows(self, taskpool: BaseTaskPool) -> dict[str, dict[str, Any]]:
        """Label -> the task pool's report of the pretrained model, the individual models and each baseline."""
        rows: dict[str, dict[str, Any]] = {}
        if self.comparison.get("pretrained", True):
            rows[PRETRAINED_ROW] = taskpool.evaluate(self.modelpool.load_pretrained_model())
        if self.comparison.get("individual", True):
            rows[INDIVIDUAL_ROW] = taskpool.evaluate(own_task_models(self.modelpool))
        for label, config in dict(self.comparison.get("baselines") or {}).items():
            method = self._instantiate_and_setup(config)
            method.on_run_start()
            model = method.run(self.modelpool)
            method.on_run_end()
            rows[label] = taskpool.evaluate(model["model"] if isinstance(model, dict) else model)
        for label, report in rows.items():
            log.info(f"comparison, {label}: average {report['average']}")
        return rows

    def evaluate_merged_model(self, taskpool: BaseTaskPool, merged_model: Any, *args, **kwargs) -> Any:
        """FusionBench's evaluation of the method's output, plus the ``comparison`` rows (computed once)."""
        report = super().evaluate_merged_model(taskpool, merged_model, *args, **kwargs)
        if not self._compared and isinstance(report, dict):
            self._compared = True
            report["comparison"] = self.comparison_rows(taskpool)
        return report

    def table(self, report: Mapping[str, Any]) -> str:
        """The comparison table of a report this program wrote."""
        name = self.comparison.get("name") or type(self.method).__name__
        rows = {**report["comparison"], name: method_evaluation(report)}
        return comparison_table(rows, f"on the same test splits, every row scored in this run by "
                                      f"{type(self.taskpool).__name__}")

    def run(self) -> dict[str, Any]:
        result = super().run()
        report = result["report"]
        if isinstance(report, dict) and "comparison" in report and rank_zero_only.rank == 0:
            print("\n" + self.table(report))
        return result
