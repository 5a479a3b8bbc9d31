"""PAVE's input statistics on disk: one safetensors file per task, and a directory of them that
``method=pave_statistics`` writes and PAVE (``statistics: <dir>``) or RegMean read.

Task file (``pave_cov_v3_<key>.safetensors``; a covariance cache entry and a directory's task file
are the same file, byte for byte, written by ``save_task_stats``): one tensor per distinct Linear
input, its X^T X sum over the calibration token rows (in the order collected). The header's
``__metadata__`` holds JSON strings: ``format`` ("pave-covariance-stats/2"), ``count`` (token rows
per input), ``input_of`` (the input each Linear reads: q/k/v share one), ``parts`` (what the
statistics were made from: model fingerprint, dataset and preprocessor fingerprints, num_samples,
num_rows, seed, mask_padding, max_length, dtype, exclude patterns, calibration split, padding and
sample order;
their hash is ``<key>``) and the
CRC-32 of each tensor, which ``LazyTensors`` checks on every read (io/safetensors.py).

Directory (format "fusion-bench-pave-statistics/1"): the task files and ``statistics.json``:
``{"format": ..., "tasks": {task: {"file", "rows" (token rows per input), <every key part>}}}``, plus the manifest of io/atomic.py. It is written atomically: complete or absent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable

from fusion_bench_pave.io.atomic import atomic_output_dir
from fusion_bench_pave.io.fingerprint import cache_key, canonical
from fusion_bench_pave.io.safetensors import CHECKSUMS, LazyTensors, write_tensors
from fusion_bench_pave.pave.covariance import CovarianceStats

FORMAT = "pave-covariance-stats/2"
RESERVED = ("format", "count", "input_of", CHECKSUMS)
DIRECTORY_FORMAT = "fusion-bench-pave-statistics/1"
DIRECTORY_INDEX = "statistics.json"


def save_stats(handle: BinaryIO, stats: CovarianceStats, metadata: Mapping[str, str] | None = None) -> None:
    """Write `stats` (and extra string `metadata`) to an open binary handle."""
    extra = dict(metadata or {})
    if clash := set(extra) & set(RESERVED):
        raise ValueError(f"metadata keys {sorted(clash)} are reserved by the statistics file")
    header = {"format": FORMAT, "count": json.dumps(stats.count), "input_of": json.dumps(stats.input_of), **extra}
    write_tensors(handle, stats.xtx, header)


def load_stats(path: str | os.PathLike) -> tuple[CovarianceStats, dict[str, str]]:
    """Statistics whose `xtx` is a LazyTensors over `path` (every read checked), and the file's
    extra metadata. ValueError if the file is not a statistics file of this format."""
    tensors = LazyTensors(path)
    metadata = dict(tensors.metadata)
    if metadata.get("format") != FORMAT or not tensors.checked:
        tensors.close()
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r} (with checksums)")
    stats = CovarianceStats(
        xtx=tensors, count=json.loads(metadata.pop("count")), input_of=json.loads(metadata.pop("input_of"))
    )
    del metadata["format"]
    return stats, metadata


def task_file_name(parts: Mapping[str, Any]) -> str:
    """The name of the task file of statistics made from these key parts."""
    return f"pave_cov_v3_{cache_key(parts)}.safetensors"


def save_task_stats(handle: BinaryIO, stats: CovarianceStats, parts: Mapping[str, Any]) -> None:
    """Write a task file: `stats` and the key parts they were made from."""
    save_stats(handle, stats, {"parts": json.dumps(canonical(parts), sort_keys=True)})


def load_task_stats(path: str | os.PathLike) -> tuple[CovarianceStats, Any]:
    """A task file's (lazy) statistics and the key parts it records (None if it has none)."""
    stats, metadata = load_stats(path)
    return stats, json.loads(metadata.get("parts", "null"))


@contextmanager
def statistics_dir_writer(
    path: str | os.PathLike, overwrite: bool = False
) -> Iterator[Callable[[str, Mapping[str, Any], CovarianceStats], None]]:
    """Yield ``add(task, parts, stats)``, which writes one task file into a staging copy of the
    directory `path`; on success the index is written and the directory published atomically
    (refused if `path` exists, unless `overwrite` and it holds only what we wrote there)."""
    with atomic_output_dir(path, overwrite) as staging:
        tasks: dict[str, dict[str, Any]] = {}

        def add(task: str, parts: Mapping[str, Any], stats: CovarianceStats) -> None:
            name = task_file_name(parts)
            with open(staging / name, "wb") as handle:
                save_task_stats(handle, stats, parts)
            tasks[task] = {**canonical(parts), "file": name, "rows": dict(stats.count)}

        yield add
        index = {"format": DIRECTORY_FORMAT, "tasks": tasks}
        (staging / DIRECTORY_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))


def read_statistics_index(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{task: entry} of the statistics directory `path`; ValueError if it is not one of this format."""
    index_path = Path(path) / DIRECTORY_INDEX
    if not index_path.is_file():
        raise ValueError(
            f"statistics={path} is not a statistics directory (no {DIRECTORY_INDEX}); write one with "
            "`fusion_bench method=pave_statistics modelpool=... method.output_dir=...`"
        )
    index = json.loads(index_path.read_text())
    if index.get("format") != DIRECTORY_FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {DIRECTORY_FORMAT!r}")
    return index["tasks"]


def load_task_from_dir(path: str | os.PathLike, task: str, entry: Mapping[str, Any]) -> CovarianceStats:
    """The task's statistics from the directory `path`, their checksums verified; ValueError if the
    file's key parts are not the index's."""
    file = Path(path) / entry["file"]
    stats, parts = load_task_stats(file)
    if parts is None or any(entry.get(key) != value for key, value in parts.items()):
        stats.xtx.close()
        raise ValueError(f"task '{task}': {file} records other key parts than {Path(path) / DIRECTORY_INDEX}")
    stats.xtx.verify()
    return stats
