"""The README demo's comparison (``fusion_bench_pave.comparison``): the demo preset's program run in process
on the tiny CLIP zoo; every row checked against its model scored on its own by a fresh task pool."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fusion_bench.method import TiesMergingAlgorithm
from fusion_bench.utils import instantiate

from fusion_bench_pave.comparison import (
    INDIVIDUAL_ROW, PRETRAINED_ROW, ComparisonProgram, OwnTaskModels, comparison_table,
)

from fusion_bench_pave.taskpool.task_modulation import for_task

from conftest import compose_fusion_bench

TASKS = ["tiny_color", "tiny_shape", "tiny_stripes"]


def _demo_config(tmp_path, *overrides: str):
    """The demo preset on the tiny CLIP pool, with PAVE at a rho that changes TIES's result; no logger (so
    no Hydra output directory is needed) and the report written into ``tmp_path``."""
    return compose_fusion_bench([
        "+preset=pave_ties_zoo_minilm", "modelpool=tiny_clip", "taskpool=tiny_clip", "method.rho=0.75",
        "method.num_samples=16", "method.cache_dir=null", "print_config=false", "~fabric.loggers",
        f"path.log_dir={tmp_path}", f"path.work_dir={tmp_path}", f"report_save_path={tmp_path / 'report.json'}", *overrides,
    ])


def _pool(config):
    return instantiate(config, _recursive_=False)


def _accuracies(report: dict) -> dict[str, float]:
    return {key: report[key]["accuracy"] for key in [*TASKS, "average"]}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_cache):
    """(composed config, stdout, report) of the demo program on the tiny CLIP pool."""
    import sys
    from io import StringIO

    tmp_path = tmp_path_factory.mktemp("demo")
    cfg = _demo_config(tmp_path)
    program = instantiate(cfg)
    assert isinstance(program, ComparisonProgram)
    stdout, sys.stdout = sys.stdout, StringIO()
    try:
        result = program.run()
        printed = sys.stdout.getvalue()
    finally:
        sys.stdout = stdout
    return cfg, printed, result["report"]


def test_demo_ends_with_one_line_per_model_and_the_reports_numbers(demo_run):
    _, printed, report = demo_run
    assert list(report["comparison"]) == [PRETRAINED_ROW, INDIVIDUAL_ROW, "TIES-Merging"]
    rows = {**{label: _accuracies(r) for label, r in report["comparison"].items()},
            "PAVE + TIES-Merging": _accuracies(report["model"])}
    width = len(INDIVIDUAL_ROW)
    expected = ["Accuracy (%) on the same test splits, every row scored in this run by CLIPVisionTaskPool:",
                " " * width + "  average  tiny_color  tiny_shape  tiny_stripes"]
    for label, acc in rows.items():
        cells = [f"{100 * acc[key]:.1f}".rjust(max(len(key), 5)) for key in ["average", *TASKS]]
        expected.append(label.ljust(width) + "  " + "  ".join(cells))
    assert printed.rstrip().splitlines()[-6:] == expected
    # the PAVE row is the run's own report, and PAVE at rho 0.75 is not TIES alone
    assert rows["PAVE + TIES-Merging"] != rows["TIES-Merging"]
    assert "Instantiate by calling" not in printed  # print_function_call: false


def test_the_saved_report_holds_the_comparison(demo_run, tmp_path_factory):
    cfg, _, report = demo_run
    with open(cfg.report_save_path) as f:
        saved = json.load(f)
    assert saved["comparison"] == report["comparison"] and saved["model"] == report["model"]


def test_each_row_is_its_model_scored_on_its_own(demo_run):
    cfg, _, report = demo_run
    pool, taskpool = _pool(cfg.modelpool), _pool(cfg.taskpool)
    rows = report["comparison"]
    assert _accuracies(rows[PRETRAINED_ROW]) == _accuracies(taskpool.evaluate(pool.load_pretrained_model()))
    for task in TASKS:  # each fine-tuned model on its own task
        own = taskpool.evaluate(pool.load_model(task))[task]["accuracy"]
        assert rows[INDIVIDUAL_ROW][task]["accuracy"] == own
    assert rows[INDIVIDUAL_ROW]["average"]["accuracy"] == pytest.approx(
        sum(rows[INDIVIDUAL_ROW][t]["accuracy"] for t in TASKS) / 3, abs=1e-12)
    ties = TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum").run(pool)
    assert _accuracies(rows["TIES-Merging"]) == _accuracies(taskpool.evaluate(ties))
    # the three rows differ: the individual models beat the pretrained one on every task
    assert all(rows[INDIVIDUAL_ROW][t]["accuracy"] > rows[PRETRAINED_ROW][t]["accuracy"] for t in TASKS)


def test_bad_comparison_keys_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"unknown comparison key\(s\) \['individuals'\]"):
        instantiate(_demo_config(tmp_path, "+comparison.individuals=true"))
    with pytest.raises(ValueError, match="comparison.baselines.TA must be a method config with a _target_"):
        instantiate(_demo_config(tmp_path, "+comparison.baselines.TA.scaling_factor=0.3"))


def test_own_task_models_answer_for_the_task_they_are_set_to():
    models = OwnTaskModels({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    x = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="never called set_task"):
        models(x)
    assert not hasattr(models, "backbone")
    models.set_task("b")
    assert torch.equal(models(x), models.models["b"](x))
    assert for_task(models, "a") is models.models["a"]  # what our task pools score
    with pytest.raises(ValueError, match="no fine-tuned model for task 'c'"):
        models.set_task("c")


def test_table_columns_follow_the_first_row():
    def report(a: float, b: float) -> dict:
        return {"model_info": {}, "x": {"accuracy": a}, "long_task_name": {"accuracy": b},
                "average": {"accuracy": (a + b) / 2}}

    table = comparison_table({"one": report(0.5, 1.0), "second": report(0.25, 0.125)}, "here")
    assert table.splitlines() == [
        "Accuracy (%) here:",
        "        average      x  long_task_name",
        "one        75.0   50.0           100.0",
        "second     18.8   25.0            12.5",
    ]
