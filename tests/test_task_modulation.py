"""EMR-Merging returns a task-modulated model; our task pools evaluate each task with its own
modulation (FusionBench 0.2.33's pools fail with "No task specified")."""

from __future__ import annotations

import json

import pytest

from fusion_bench.method.emr_merging import EMRMerging
from fusion_bench.utils import instantiate

from conftest import REPO_ROOT, compose_fusion_bench, run_fusion_bench


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_each_task_is_scored_with_its_own_modulation(kind):
    cfg = compose_fusion_bench([f"modelpool=tiny_{kind}", f"taskpool=tiny_{kind}"])
    pool, taskpool = instantiate(cfg.modelpool), instantiate(cfg.taskpool)
    report = taskpool.evaluate(EMRMerging().run(pool))
    for task in pool.model_names:
        reference = EMRMerging().run(pool)
        reference.set_task(task)
        expected = taskpool.evaluate(reference.backbone)[task]["accuracy"]  # a plain model now
        assert report[task]["accuracy"] == expected
    # the modulations differ: scoring every task with one of them would not give these numbers
    other = EMRMerging().run(pool)
    other.set_task(pool.model_names[0])
    plain = taskpool.evaluate(other.backbone)
    assert any(plain[t]["accuracy"] != report[t]["accuracy"] for t in pool.model_names[1:])


@pytest.mark.slow
def test_cli_emr_and_pave_emr_at_rho_one_give_the_same_report(tmp_path):
    common = ["modelpool=tiny_clip", "taskpool=tiny_clip", "print_config=false"]
    run_fusion_bench(["method=emr_merging/emr_merging", *common, f"path.log_dir={tmp_path / 'emr'}"], cwd=REPO_ROOT)
    run_fusion_bench(
        ["method=pave_emr", "method.rho=1", "method.num_samples=16", "method.cache_dir=null", *common,
         f"path.log_dir={tmp_path / 'pave'}"],
        cwd=REPO_ROOT,
    )
    emr = json.loads((tmp_path / "emr" / "program_report.json").read_text())
    pave = json.loads((tmp_path / "pave" / "program_report.json").read_text())
    assert pave["model"] == emr
    assert set(emr) >= {"tiny_color", "tiny_shape", "tiny_stripes", "average"}
