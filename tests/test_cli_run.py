"""A full offline `fusion_bench` run (merge + save + evaluate) on the tiny CLIP pool."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionModel

from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.utils import instantiate

from conftest import REPO_ROOT, compose_fusion_bench, run_fusion_bench


@pytest.mark.slow
def test_task_arithmetic_cli_run_writes_report_equal_to_in_process_merge(tmp_path):
    log_dir, saved = tmp_path / "logs", tmp_path / "merged"
    run_fusion_bench(
        ["method=task_arithmetic", "method.scaling_factor=0.5", "modelpool=tiny_clip", "taskpool=tiny_clip",
         f"path.log_dir={log_dir}", f"merged_model_save_path={saved}", "print_config=false"],
        cwd=REPO_ROOT,
    )
    report = json.loads((log_dir / "program_report.json").read_text())
    tasks = ["tiny_color", "tiny_shape", "tiny_stripes"]
    assert set(tasks) <= set(report)

    # The same merge in this process must give the same weights and the same accuracies.
    cfg = compose_fusion_bench(["modelpool=tiny_clip", "taskpool=tiny_clip"])
    pool, taskpool = instantiate(cfg.modelpool), instantiate(cfg.taskpool)
    merged = TaskArithmeticAlgorithm(scaling_factor=0.5).run(pool)
    reloaded = CLIPVisionModel.from_pretrained(saved)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    expected = taskpool.evaluate(merged)
    for task in tasks:
        assert report[task]["accuracy"] == pytest.approx(expected[task]["accuracy"], abs=1e-9)
    # and the merge carries knowledge: better than the random pretrained model (chance = 0.25)
    pretrained = taskpool.evaluate(pool.load_pretrained_model())
    assert pretrained["average"]["accuracy"] == pytest.approx(0.25, abs=0.07)
    assert report["average"]["accuracy"] > pretrained["average"]["accuracy"] + 0.1
