"""Where each task's covariance statistics live between collection and purification.

In memory, T tasks hold T * sum_inputs d_in^2 float64 values at once (8.5 GB for a full CLIP
ViT-B/32 and T = 8), although purification reads one layer's covariances of all tasks at a time.
On disk, each task's statistics are a safetensors file read one tensor per lookup (io/statistics.py):
the covariance cache's file when a cache is configured, else a file in a temporary directory that
lives for one run (removed on exit, also on error). Either way purification sees the same tensors,
bit for bit.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Literal, Optional

from torch import Tensor

from fusion_bench_pave.io.safetensors import LazyTensors
from fusion_bench_pave.io.statistics import load_stats, save_stats
from fusion_bench_pave.pave.covariance import CovarianceStats

log = logging.getLogger(__name__)

Offload = Literal["auto", "memory", "disk"]
#: auto goes to disk once T times the first task's statistics would exceed this many bytes
AUTO_THRESHOLD = 2**30
SPILL_PREFIX = "pave_covariance_"


def stats_bytes(stats: CovarianceStats) -> int:
    """Bytes of the X^T X sums, without reading any that are on disk."""
    if isinstance(stats.xtx, LazyTensors):
        return stats.xtx.nbytes
    return sum(t.numel() * t.element_size() for t in stats.xtx.values())


def goes_to_disk(mode: Offload, first_task_bytes: int, num_tasks: int, threshold: int = AUTO_THRESHOLD) -> bool:
    """The placement of all tasks' statistics, decided once from the first task's size."""
    if mode == "auto":
        return first_task_bytes * num_tasks > threshold
    return mode == "disk"


class CovarianceOffload:
    """Context manager placing each task's statistics (`keep`) in memory or on disk, per `mode`.

    Statistics already on disk (covariance cache files) stay there, or are read fully for
    mode=memory; statistics in memory are spilled to a temporary directory (under TMPDIR) for
    mode=disk. On exit every file is closed and the temporary directory removed."""

    def __init__(self, mode: Offload, num_tasks: int, threshold: int = AUTO_THRESHOLD):
        self.mode = mode
        self.num_tasks = num_tasks
        self.threshold = threshold
        self.on_disk: Optional[bool] = None  # decided by the first `keep`
        self.spill_dir: Optional[Path] = None
        self._opened: list[LazyTensors] = []
        self._spilled = 0

    def __enter__(self) -> "CovarianceOffload":
        return self

    def __exit__(self, *exc) -> None:
        for tensors in self._opened:
            tensors.close()
        self._opened.clear()
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None

    def keep(self, stats: CovarianceStats) -> CovarianceStats:
        """`stats` where they should live for the rest of the run (the caller drops the original)."""
        if isinstance(stats.xtx, LazyTensors):
            self._opened.append(stats.xtx)
        if self.on_disk is None:
            size = stats_bytes(stats)
            self.on_disk = goes_to_disk(self.mode, size, self.num_tasks, self.threshold)
            log.info(f"PAVE covariance statistics kept {'on disk' if self.on_disk else 'in memory'} "
                     f"({self.num_tasks} tasks x {size / 2**20:.0f} MiB, covariance_offload={self.mode})")
        if not self.on_disk:
            return materialized(stats)
        if isinstance(stats.xtx, LazyTensors):
            return stats
        if self.spill_dir is None:
            self.spill_dir = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX))
        path = self.spill_dir / f"task{self._spilled}.safetensors"
        self._spilled += 1
        with open(path, "wb") as handle:
            save_stats(handle, stats)
        spilled, _ = load_stats(path)
        self._opened.append(spilled.xtx)
        return spilled


def materialized(stats: CovarianceStats) -> CovarianceStats:
    """`stats` with every X^T X sum in memory (read from disk if lazy)."""
    if not isinstance(stats.xtx, LazyTensors):
        return stats
    xtx: dict[str, Tensor] = dict(stats.xtx.items())
    stats.xtx.close()
    return CovarianceStats(xtx=xtx, count=dict(stats.count), input_of=dict(stats.input_of))
