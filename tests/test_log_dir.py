"""Every run logs into a directory of its own: single runs started in the same second get distinct
timestamped directories (``fbp_job_log_dir`` claims them with an exclusive mkdir), so no report is
overwritten; multirun jobs keep ``<sweep dir>/<job number>/``."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fusion_bench_pave.resolvers import claim_dir

from conftest import REPO_ROOT

CLAIMER = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("resolvers", sys.argv[3])  # by path: the plugin import takes seconds
resolvers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(resolvers)
while not os.path.exists(sys.argv[2]):  # start together
    time.sleep(0.001)
print(resolvers.claim_dir(sys.argv[1]))
"""


def test_processes_claiming_the_same_base_at_once_get_distinct_directories(tmp_path):
    base, go = tmp_path / "logs" / "2026-01-01_10-00-00", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(base), str(go), str(REPO_ROOT / "fusion_bench_pave" / "resolvers.py")],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    time.sleep(1.0)
    go.touch()
    claimed = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sorted(claimed) == sorted([str(base), *(f"{base}_{n}" for n in range(2, 7))])
    assert sorted(os.listdir(base.parent)) == sorted(Path(c).name for c in claimed)


def test_a_taken_base_gets_the_next_suffix_and_the_process_keeps_its_claim(tmp_path):
    base = tmp_path / "2026-01-01_10-00-00"
    (base).mkdir()
    (base / "program_report.json").write_text("earlier run")
    Path(f"{base}_2").mkdir()
    assert claim_dir(str(base)) == f"{base}_3"
    assert claim_dir(str(base)) == f"{base}_3"  # resolved again later in the same run
    assert sorted(os.listdir(tmp_path)) == ["2026-01-01_10-00-00", "2026-01-01_10-00-00_2", "2026-01-01_10-00-00_3"]
    assert (base / "program_report.json").read_text() == "earlier run"


@pytest.mark.slow
def test_two_cli_runs_in_the_same_second_keep_both_reports(tmp_path):
    """Every timestamped directory the runs could pick (the next 15 minutes) is taken beforehand, as
    by a run started in that second: each run must claim a suffixed one of its own."""
    runs = tmp_path / "fabric_model_fusion"
    start = datetime.datetime.now().replace(microsecond=0)
    taken = [runs / (start + datetime.timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S") for s in range(-5, 900)]
    for directory in taken:
        directory.mkdir(parents=True)
        (directory / "program_report.json").write_text("another run")
    exe = Path(sys.executable).with_name("fusion_bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(exe), "method=task_arithmetic", "path=per_job", f"method.scaling_factor={factor}",
                               "modelpool=tiny_clip", "taskpool=tiny_clip", f"path.output_dir={tmp_path}", "print_config=false"],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for factor in (0.3, 0.7)]
    for proc in procs:
        output = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, output[-4000:]
    new = sorted(set(runs.iterdir()) - set(taken))
    assert len(new) == 2 and all(p.name[:-2] in {t.name for t in taken} and p.name[-2] == "_" for p in new)
    factors = {dict(o.split("=", 1) for o in yaml.safe_load((p / "overrides.yaml").read_text()))["method.scaling_factor"]
               for p in new}
    assert factors == {"0.3", "0.7"}
    for p in new:
        assert "tiny_color" in yaml.safe_load((p / "program_report.json").read_text())  # JSON is YAML
    assert all(sorted(os.listdir(t)) == ["program_report.json"] and (t / "program_report.json").read_text() == "another run"
               for t in taken)
