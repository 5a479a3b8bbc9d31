"""The sweep summary: one row per job, varying overrides only, sorted by the chosen metric."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from fusion_bench_pave.summarize import main, summarize


def _job(sweep: Path, name: str, overrides: list[str], accs: dict[str, float] | None, extras: dict | None = None):
    job = sweep / name
    job.mkdir(parents=True)
    (job / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    os.utime(job / "overrides.yaml", (1000, 1000))
    if accs is None:
        return
    report = {"model_info": {"all_params": 1234, "trainable_params": 1234}}
    report |= {task: {"accuracy": acc, "loss": 1.0} for task, acc in accs.items()}
    report["average"] = {"accuracy": sum(accs.values()) / len(accs)}
    if extras is not None:  # a method returning {"model": m, "pave": extras}, as FusionBench reports it
        report = {"model": report, "pave": extras}
    (job / "program_report.json").write_text(json.dumps(report))
    os.utime(job / "program_report.json", (1012.5, 1012.5))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    common = ["method=pave_ties", "modelpool=tiny_clip"]
    _job(tmp_path, "0", common + ["method.rho=0.5", "method.merger.scaling_factor=0.3"], {"a": 0.5, "b": 0.7})
    _job(tmp_path, "1", common + ["method.rho=0.5", "method.merger.scaling_factor=0.6"], {"a": 0.9, "b": 0.9})
    _job(tmp_path, "2", common + ["method.rho=1.0", "method.merger.scaling_factor=0.3"], {"a": 0.7, "b": 0.6}, extras={"kept": 0.5})
    _job(tmp_path, "10", common + ["method.rho=1.0", "method.merger.scaling_factor=0.6"], None)  # crashed job
    return tmp_path


def _rows(path: Path) -> list[list[str]]:
    with open(path) as handle:
        return list(csv.reader(handle))


def test_table_has_varying_overrides_sorted_by_average(sweep):
    markdown = summarize(sweep)
    rows = _rows(sweep / "summary.csv")
    assert rows[0] == ["job", "method.rho", "method.merger.scaling_factor", "a", "b", "average", "params", "seconds"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "0"]
    assert rows[1] == ["1", "0.5", "0.6", "0.9000", "0.9000", "0.9000", "1234", "12.5"]
    assert "Common overrides: `method=pave_ties` `modelpool=tiny_clip`" in markdown
    assert "Jobs without a report (failed or unfinished): 10" in markdown
    assert (sweep / "summary.md").read_text() == markdown
    png = (sweep / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_sorting_by_another_metric(sweep):
    summarize(sweep, metric="b.accuracy")
    rows = _rows(sweep / "summary.csv")
    assert rows[0][-3] == "b.accuracy"
    assert [r[0] for r in rows[1:]] == ["1", "0", "2"]  # b: 0.9, 0.7, 0.6


def test_metric_from_method_extras(sweep):
    summarize(sweep, metric="pave.kept")
    rows = _rows(sweep / "summary.csv")
    assert rows[1][0] == "2" and rows[1][rows[0].index("pave.kept")] == "0.5000"
    assert [r[rows[0].index("pave.kept")] for r in rows[2:]] == ["", ""]


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _job(tmp_path, "0", ["method=pave_ta"], None)
    assert main([str(tmp_path)]) == 2
    assert "path=per_job" in capsys.readouterr().err
