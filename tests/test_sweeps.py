"""A 2x2 `fusion_bench -m` sweep over rho and lambda: one report per job, statistics collected
once and shared through the covariance cache, and a summary table over all four jobs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, run_fusion_bench


@pytest.mark.slow
def test_pave_sweep_keeps_every_report_shares_the_cache_and_summarizes(tmp_path):
    sweep = tmp_path / "sweep"
    run_fusion_bench(
        ["-m", "method=pave_ta", "modelpool=tiny_t5", "taskpool=tiny_t5", "method.num_samples=16",
         "method.rho=0.8,0.9", "method.merger.scaling_factor=0.3,0.6",
         f"method.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", "print_config=false"],
        cwd=REPO_ROOT,
    )
    seen = set()
    for job in range(4):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((sweep / str(job) / "overrides.yaml").read_text()))
        report = json.loads((sweep / str(job) / "program_report.json").read_text())
        # the report in job n's directory is job n's own, not the last job's
        assert report["pave"]["rho"] == float(overrides["method.rho"])
        seen.add((overrides["method.rho"], overrides["method.merger.scaling_factor"]))
        # statistics are collected by the first job only; every later job reads them from the cache
        expected_hits = [] if job == 0 else ["sentiment", "topic", "weather"]
        assert report["pave"]["covariance_cache_hits"] == len(expected_hits)
        pave_report = json.loads((sweep / str(job) / "pave_report.json").read_text())
        assert pave_report["covariance_cache_hits"] == expected_hits
    assert seen == {("0.8", "0.3"), ("0.8", "0.6"), ("0.9", "0.3"), ("0.9", "0.6")}

    summarize = Path(sys.executable).with_name("fusion-bench-pave-summarize")  # the console script
    proc = subprocess.run([str(summarize), str(sweep)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| job | method.rho | method.merger.scaling_factor |" in proc.stdout
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 5
    averages = [float(r[rows[0].index("average")]) for r in rows[1:]]
    assert averages == sorted(averages, reverse=True)
    assert (sweep / "summary.png").stat().st_size > 5000

