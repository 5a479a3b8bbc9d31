"""What a PAVE run reports: the extras (settings, times, cache use, ranks), their short summary for
the program's report, and pave_report.json + the rank heatmap in the log directory."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from fusion_bench_pave.io.atomic import atomic_write_text
from fusion_bench_pave.pave.plot import save_rank_heatmap


def run_extras(
    settings: Mapping[str, Any],
    times: Mapping[str, float],
    cache_hits: list[str],
    on_disk: bool,
    ranks: Mapping[str, Mapping[str, int]],
    full_ranks: Mapping[str, int],
) -> dict[str, Any]:
    """The extras of one run: `settings` (rho, allocation, ...) first. kept_ratio: each purified
    task's kept rank over its full rank, summed over the purified Linears (excluded ones are not
    counted, as in rho's budget)."""
    return {
        **settings,
        "covariance_time_s": times["covariance"],
        "purification_time_s": times["purification"],
        "covariance_cache_hits": list(cache_hits),
        "covariance_offload": "disk" if on_disk else "memory",
        "kept_ratio": {t: sum(r.values()) / max(1, sum(full_ranks.values())) for t, r in ranks.items()},
        "full_ranks": dict(full_ranks),
        "ranks": {t: dict(r) for t, r in ranks.items()},
    }


def report_summary(extras: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the extras that goes into the program's report: settings, times, cache hits and
    each task's kept-rank ratio. The per-(task, layer) rank table would be hundreds of lines on a real
    model, so it stays in pave_report.json; cache hits are a count, since FusionBench's report printer
    fails on an empty list."""
    summary = {k: v for k, v in extras.items() if k not in ("full_ranks", "ranks", "covariance_cache_hits")}
    summary["covariance_cache_hits"] = len(extras["covariance_cache_hits"])
    return summary


def write_extras(log_dir: str, extras: Mapping[str, Any]) -> None:
    """pave_report.json and the rank heatmap PNG into `log_dir`."""
    atomic_write_text(os.path.join(log_dir, "pave_report.json"), json.dumps(extras, indent=2))
    if extras["full_ranks"]:
        save_rank_heatmap(extras["ranks"], extras["full_ranks"], os.path.join(log_dir, "pave_ranks.png"))
