"""Gather every job of a ``fusion_bench -m`` sweep into one table and plot.

    python -m fusion_bench_pave.summarize outputs/multirun/fabric_model_fusion/2026-11-24_10-00-00

Each job directory (``<sweep>/<n>/``) holds Hydra's ``overrides.yaml`` and, when the job logs into
its own directory (our presets do), FusionBench's ``program_report.json``. The table has one row per
job: the overrides that vary across the sweep, per-task and average accuracy, parameter count and
wall time, sorted by the chosen metric (best first). Writes ``summary.md``, ``summary.csv`` and
``summary.png`` next to the jobs.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusion_bench_pave.io.atomic import atomic_file, atomic_write_text

REPORT_NAME = "program_report.json"
NON_TASK_KEYS = {"model_info", "average"}


@dataclass
class Job:
    """One finished sweep job: its overrides and its report."""

    name: str
    overrides: dict[str, str]
    report: dict[str, Any]
    seconds: float
    values: dict[str, float] = field(default_factory=dict)


def lookup(report: dict[str, Any], dotted: str) -> float | None:
    """``report["average"]["accuracy"]`` for ``"average.accuracy"``; None where absent."""
    node: Any = report
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) else None


def evaluation(report: dict[str, Any]) -> dict[str, Any]:
    """The task pool's part of a report. Methods that return ``{"model": m, <extras>}`` (PAVE does)
    get ``{"model": <evaluation>, <extras>}`` from FusionBench; then the evaluation is ``report["model"]``."""
    if "average" in report:
        return report
    nested = [v for v in report.values() if isinstance(v, dict) and "average" in v]
    return nested[0] if len(nested) == 1 else report


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Subdirectories holding Hydra's ``overrides.yaml``, in job-number order."""
    dirs = (p for p in sweep_dir.iterdir() if p.is_dir() and (p / "overrides.yaml").exists())
    return sorted(dirs, key=lambda p: (len(p.name), p.name))


def load_jobs(sweep_dir: Path) -> tuple[list[Job], list[str]]:
    """Jobs with a report, and the names of job directories that have none (failed or running)."""
    jobs, missing = [], []
    for job_dir in job_dirs(sweep_dir):
        overrides_file = job_dir / "overrides.yaml"
        report_file = job_dir / REPORT_NAME
        if not report_file.exists():
            missing.append(job_dir.name)
            continue
        overrides = dict(o.split("=", 1) for o in (yaml.safe_load(overrides_file.read_text()) or []))
        seconds = report_file.stat().st_mtime - overrides_file.stat().st_mtime
        jobs.append(Job(job_dir.name, overrides, json.loads(report_file.read_text()), seconds))
    return jobs, missing


def metric_value(report: dict[str, Any], metric: str) -> float | None:
    """``metric`` looked up in the evaluation first, then in the whole report (method extras)."""
    value = lookup(evaluation(report), metric)
    return value if value is not None else lookup(report, metric)


def metric_keys(report: dict[str, Any]) -> list[str]:
    """Every dotted key ``--metric`` accepts for ``report``: the evaluation's numbers, then the
    method extras' (e.g. ``pave.kept``)."""

    def leaves(node: dict[str, Any], prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            elif isinstance(value, (int, float)):
                yield f"{prefix}{key}"

    scores = evaluation(report)
    extras = {} if scores is report else {k: v for k, v in report.items() if v is not scores}
    return [*leaves(scores), *leaves(extras)]


def check_metric(jobs: list[Job], metric: str) -> None:
    """``ValueError`` listing the available keys, closest first, if no job's report has ``metric``."""
    if any(metric_value(job.report, metric) is not None for job in jobs):
        return
    keys = list(dict.fromkeys(k for job in jobs for k in metric_keys(job.report)))
    closest = difflib.get_close_matches(metric, keys, n=len(keys), cutoff=0.0)
    raise ValueError(f"metric {metric!r} is in no job's report; available metrics, closest first: {', '.join(closest)}")


def logged_error(job_dir: Path) -> str:
    """Where a job without a report failed: the last exception line of its Hydra log, and the log."""
    logs = sorted(job_dir.glob("*.log"))
    if not logs:
        return f"no log in {job_dir}"
    errors = [line for log in logs for line in log.read_text(errors="replace").splitlines()
              if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line)]
    if not errors:
        return (f"no error in {logs[-1]}: still running, or it wrote its report elsewhere (run sweeps with "
                "a fusion_bench_pave method preset or path=per_job, so that every job logs into its own directory)")
    return f"{errors[-1]} (see {logs[-1]})"


def no_jobs_message(sweep_dir: Path) -> str:
    """Why ``sweep_dir`` has no job directories, with a hint when it holds sweeps or is one run's log dir."""
    message = (f"no jobs found under {sweep_dir}: expected a multirun directory (hydra.sweep.dir of "
               f"`fusion_bench -m`) whose job subdirectories 0/, 1/, ... hold overrides.yaml and {REPORT_NAME}")
    sweeps = [p.name for p in sorted(sweep_dir.iterdir()) if p.is_dir() and job_dirs(p)]
    if sweeps:
        message += f"; it holds sweeps ({', '.join(sweeps)}): pass one of them"
    elif (sweep_dir / REPORT_NAME).exists():
        message += f"; it holds the {REPORT_NAME} of a single run, not a sweep"
    return message


def varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in first-seen order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def task_names(jobs: list[Job]) -> list[str]:
    names = [k for job in jobs for k, v in evaluation(job.report).items()
             if k not in NON_TASK_KEYS and isinstance(v, dict) and "accuracy" in v]
    return list(dict.fromkeys(names))


def build_table(jobs: list[Job], metric: str) -> tuple[list[str], list[list[Any]]]:
    """Header and rows, best ``metric`` first (jobs without the metric last)."""
    swept, tasks = varying_keys(jobs), task_names(jobs)
    header = ["job", *swept, *tasks, "average", "params", "seconds"]
    if metric != "average.accuracy":
        header.insert(len(header) - 2, metric)

    def score(job: Job) -> float:
        value = metric_value(job.report, metric)
        return -math.inf if value is None else value

    rows = []
    for job in sorted(jobs, key=score, reverse=True):
        scores = evaluation(job.report)
        row = [job.name, *(job.overrides.get(k, "") for k in swept)]
        row += [lookup(scores, f"{t}.accuracy") for t in tasks]
        row.append(lookup(scores, "average.accuracy"))
        if metric != "average.accuracy":
            row.append(metric_value(job.report, metric))
        params = lookup(scores, "model_info.all_params")
        row += [None if params is None else int(params), f"{job.seconds:.1f}"]
        rows.append(row)
    return header, rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def to_markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def plot(jobs: list[Job], metric: str, x_key: str | None, path: Path) -> str:
    """Metric against ``x_key`` (a numeric override; default: the first numeric swept key, else the
    parameter count), one line per combination of the other swept keys. Returns the x label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = varying_keys(jobs)
    if x_key is None:
        numeric = [k for k in swept if all(_as_float(j.overrides.get(k, "")) is not None for j in jobs)]
        x_key = numeric[0] if numeric else "params"
    groups: dict[str, list[tuple[float, float]]] = {}
    for job in jobs:
        params = lookup(evaluation(job.report), "model_info.all_params")
        x = params if x_key == "params" else _as_float(job.overrides.get(x_key, ""))
        y = metric_value(job.report, metric)
        if x is None or y is None:
            continue
        label = ", ".join(f"{k}={job.overrides.get(k)}" for k in swept if k != x_key) or metric
        groups.setdefault(label, []).append((x, y))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(groups.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    if len(groups) > 1:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return x_key


def summarize(sweep_dir: Path, metric: str = "average.accuracy", x_key: str | None = None,
              out_dir: Path | None = None) -> str:
    """Write summary.{md,csv,png} for ``sweep_dir`` into ``out_dir`` (default: the sweep dir);
    return the Markdown table."""
    if not sweep_dir.exists():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise NotADirectoryError(f"{sweep_dir} is a file; summarize expects a sweep directory (one subdirectory per job)")
    jobs, missing = load_jobs(sweep_dir)
    if not jobs and not missing:
        raise ValueError(no_jobs_message(sweep_dir))
    if not jobs:
        failures = "".join(f"\n  {name}: {logged_error(sweep_dir / name)}" for name in missing)
        raise ValueError(f"none of the {len(missing)} jobs under {sweep_dir} has a {REPORT_NAME}:{failures}")
    check_metric(jobs, metric)
    out_dir = out_dir or sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = build_table(jobs, metric)
    markdown = to_markdown(header, rows)
    constant = {k: v for k, v in jobs[0].overrides.items() if k not in varying_keys(jobs)}
    if constant:
        markdown = "Common overrides: " + " ".join(f"`{k}={v}`" for k, v in constant.items()) + "\n\n" + markdown
    markdown += f"\nSorted by `{metric}`, best first.\n"
    if missing:
        markdown += f"Jobs without a report (failed or unfinished): {', '.join(missing)}\n"
    atomic_write_text(out_dir / "summary.md", markdown)
    with atomic_file(out_dir / "summary.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *([_cell(v) for v in row] for row in rows)])
    plot(jobs, metric, x_key, out_dir / "summary.png")
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (its subdirectories are the jobs)")
    parser.add_argument("--metric", default="average.accuracy",
                        help="dotted report key to sort and plot by; run the sweep on a validation task "
                             "pool to choose hyperparameters (default: %(default)s)")
    parser.add_argument("--x", dest="x_key", default=None,
                        help="override key for the plot's x axis (default: first numeric swept key, else params)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the sweep directory)")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.sweep_dir, args.metric, args.x_key, args.out), end="")
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
