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


def test_a_metric_in_no_report_is_refused_listing_the_available_keys_closest_first(sweep, capsys):
    assert main([str(sweep), "--metric", "average.acuracy"]) == 2
    assert capsys.readouterr().err == (
        "error: metric 'average.acuracy' is in no job's report; available metrics, closest first: average.accuracy, "
        "a.accuracy, b.accuracy, pave.kept, model_info.trainable_params, model_info.all_params, a.loss, b.loss\n")
    assert not list(sweep.glob("summary.*"))


def test_cli_errors_name_the_case(tmp_path, capsys):
    def error(path) -> str:
        assert main([str(path)]) == 2
        return capsys.readouterr().err

    assert error(tmp_path / "missing") == f"error: sweep directory {tmp_path / 'missing'} does not exist\n"
    (tmp_path / "report.json").write_text("{}")
    assert error(tmp_path / "report.json") == (
        f"error: {tmp_path / 'report.json'} is a file; summarize expects a sweep directory (one subdirectory per job)\n")
    empty = tmp_path / "empty"
    (empty / "not_a_job").mkdir(parents=True)
    layout = ("expected a multirun directory (hydra.sweep.dir of `fusion_bench -m`) whose job subdirectories "
              "0/, 1/, ... hold overrides.yaml and program_report.json")
    assert error(empty) == f"error: no jobs found under {empty}: {layout}\n"
    (empty / "program_report.json").write_text("{}")
    assert error(empty) == f"error: no jobs found under {empty}: {layout}; it holds the program_report.json of a single run, not a sweep\n"


def test_an_all_crashed_sweep_lists_each_job_and_where_its_error_is(tmp_path, capsys):
    sweeps = tmp_path / "multirun"
    crashed = sweeps / "2026-01-01_10-00-00"
    _job(crashed, "0", ["method.rho=0.5"], None)
    (crashed / "0" / "cli.log").write_text("[INFO] - merging\nTraceback (most recent call last):\n  File \"x.py\"\n"
                                           "ValueError: task 'a': its calibration dataset is empty (0 rows)\n")
    _job(crashed, "1", ["method.rho=0.9"], None)
    (crashed / "1" / "cli.log").write_text("[INFO] - merging\n")
    _job(crashed, "2", ["method.rho=1.0"], None)
    assert main([str(crashed)]) == 2
    assert capsys.readouterr().err == (
        f"error: none of the 3 jobs under {crashed} has a program_report.json:\n"
        f"  0: ValueError: task 'a': its calibration dataset is empty (0 rows) (see {crashed / '0' / 'cli.log'})\n"
        f"  1: no error in {crashed / '1' / 'cli.log'}: still running, or it wrote its report elsewhere (run sweeps "
        "with a fusion_bench_pave method preset or path=per_job, so that every job logs into its own directory)\n"
        f"  2: no log in {crashed / '2'}\n")
    assert main([str(sweeps)]) == 2  # the parent of sweeps
    assert capsys.readouterr().err.endswith("; it holds sweeps (2026-01-01_10-00-00): pass one of them\n")
