"""`fusion_bench method=pave_*` end to end on the tiny offline CLIP, T5 and Mistral pools."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from conftest import run_fusion_bench


def fusion_bench(cwd: Path, *overrides: str) -> None:
    run_fusion_bench(list(overrides), cwd=cwd)


def report(log_dir: Path) -> dict:
    with open(log_dir / "program_report.json") as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "t5", "mistral"])
def test_cli_pave_ties_on_tiny_pools(tmp_path, kind):
    log_dir = tmp_path / "logs"
    rho = {"clip": [], "t5": ["method.rho=0.9"], "mistral": ["method.rho=0.8"]}[kind]  # clip: preset 63/64
    fusion_bench(
        tmp_path, "method=pave_ties", f"modelpool=tiny_{kind}", f"taskpool=tiny_{kind}",
        "method.num_samples=32", *rho, f"path.log_dir={log_dir}", f"method.cache_dir={tmp_path / 'cache'}",
    )
    result = report(log_dir)
    assert 0 <= result["model"]["average"]["accuracy"] <= 1
    pave = json.loads((log_dir / "pave_report.json").read_text())  # the full rank table
    assert {k: v for k, v in result["pave"].items() if k != "covariance_cache_hits"} == {
        k: v for k, v in pave.items() if k not in ("ranks", "full_ranks", "covariance_cache_hits")}
    assert len(pave["ranks"]) == 3 and pave["rho"] == {"clip": 63 / 64, "t5": 0.9, "mistral": 0.8}[kind]
    for layer, full in pave["full_ranks"].items():  # every layer keeps the largest total below rho*T*R ...
        kept = sum(ranks[layer] for ranks in pave["ranks"].values())
        if kind == "clip":  # ... unless the floor binds: round(63/64 * 32) = 32, floor 32, nothing dropped
            assert (full, kept) == (32, 96)
        else:
            assert kept == math.ceil(pave["rho"] * 3 * full) - 1
    assert (log_dir / "pave_ranks.png").stat().st_size > 1000
    assert len(os.listdir(tmp_path / "cache")) == 3
    if kind == "t5":  # the same run on 2 CPU processes (DDP, gloo), each collecting half the batches
        ddp_dir = tmp_path / "ddp"
        fusion_bench(
            tmp_path, "method=pave_ties", "modelpool=tiny_t5", "taskpool=tiny_t5", "method.num_samples=32",
            "method.rho=0.9", "method.cache_dir=null", "fabric.devices=2", "fabric.strategy=ddp",
            "fabric.accelerator=cpu", f"path.log_dir={ddp_dir}",
        )
        ddp = report(ddp_dir)
        assert json.loads((ddp_dir / "pave_report.json").read_text())["ranks"] == pave["ranks"]
        # Two processes sum each task's float64 Gram matrix in another order (half the batches each, then
        # an all-reduce), so the purified float32 weights may differ in the last bit: logits agree to ~1e-6
        # and at most an example sitting on a decision boundary flips (one of 3 tasks x 64 examples).
        assert abs(ddp["model"]["average"]["accuracy"] - result["model"]["average"]["accuracy"]) <= 1 / (3 * 64) + 1e-12
        assert abs(ddp["model"]["average"]["loss"] - result["model"]["average"]["loss"]) < 1e-5


@pytest.mark.slow
def test_cli_rho_one_reports_the_same_numbers_as_ties(tmp_path):
    common = ["modelpool=tiny_clip", "taskpool=tiny_clip", "method.scaling_factor=0.9"]
    fusion_bench(tmp_path, "method=ties_merging", *common, f"path.log_dir={tmp_path / 'ties'}")
    fusion_bench(
        tmp_path, "method=pave_ties", "modelpool=tiny_clip", "taskpool=tiny_clip", "method.rho=1",
        "method.num_samples=16", "method.cache_dir=null", f"path.log_dir={tmp_path / 'pave'}",
    )
    assert report(tmp_path / "pave")["model"] == report(tmp_path / "ties")
