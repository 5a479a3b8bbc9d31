"""On-disk cache of covariance statistics keyed by (model fingerprint, dataset, preprocessor,
samples, masking, ...), so a sweep over rho or lambda collects statistics once. Each entry is a task
file of io/statistics.py, the same file a statistics directory (method=pave_statistics) holds. Writes
are atomic (fusion_bench_pave.io.atomic); every entry is checked against its checksums before use."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from fusion_bench_pave.io.atomic import atomic_file
from fusion_bench_pave.io.fingerprint import canonical
from fusion_bench_pave.io.statistics import load_task_stats, save_task_stats, task_file_name
from fusion_bench_pave.pave.covariance import CovarianceStats

log = logging.getLogger(__name__)


class CovarianceCache:
    """Directory of task files (io/statistics.py), one per key, recording the key parts they were
    made from. Loaded statistics are lazy: each covariance is read from the file when used. The
    version in the file name keeps files of older formats (``pave_cov_<key>.pt``, ``pave_cov_v2_*``
    without checksums) out of reach. ``writable=False``: entries are read, never saved."""

    def __init__(self, root: str | os.PathLike, writable: bool = True):
        self.root = Path(root)
        self.writable = writable

    def path(self, parts: Mapping[str, Any]) -> Path:
        return self.root / task_file_name(parts)

    def load(self, parts: Mapping[str, Any]) -> Optional[CovarianceStats]:
        """Cached statistics for these key parts, or None. The whole entry is read once and checked
        against its checksums first (one tensor at a time), so a damaged entry is recomputed before
        any of it is used; later reads are checked again (io.safetensors.LazyTensors)."""
        path = self.path(parts)
        if not path.exists():
            return None
        try:
            stats, recorded = load_task_stats(path)
        except Exception as error:  # truncated/corrupt file (e.g. written by another tool): recompute
            log.warning(f"covariance cache entry {path} is unreadable; recomputing it: {error}")
            return None
        if recorded != canonical(parts):
            stats.xtx.close()
            log.warning(f"ignoring covariance cache {path}: key parts differ (hash collision?)")
            return None
        try:
            stats.xtx.verify()
        except Exception as error:  # same size, damaged content
            stats.xtx.close()
            log.warning(f"covariance cache entry {path} is corrupt; recomputing it: {error}")
            return None
        log.debug(f"covariance statistics from the cache: {path}")
        return stats

    def save(self, parts: Mapping[str, Any], stats: CovarianceStats) -> Path:
        """Write atomically: a reader sees the old file, the new file, or nothing; never half a file."""
        path = self.path(parts)
        with atomic_file(path, "wb") as handle:
            save_task_stats(handle, stats, parts)
        return path


def open_cache(root: str | os.PathLike) -> Optional[CovarianceCache]:
    """The cache at ``root`` (created if missing), read-only if no file can be created in it, or
    None if ``root`` is not a usable directory; each degraded case logs one warning. The cache is
    optional, so an unusable one costs recomputation, never the run."""
    root = Path(root)
    try:
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"{root} is a file, not a directory")
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning(f"PAVE covariance cache_dir {root} cannot be used ({error}); running WITHOUT the cache.")
        return None
    try:
        fd, probe = tempfile.mkstemp(dir=root, prefix=".pave_write_probe_")
    except OSError as error:
        log.warning(
            f"PAVE covariance cache_dir {root} is not writable ({error}); entries already there are "
            "used, new covariance statistics are NOT saved."
        )
        return CovarianceCache(root, writable=False)
    os.close(fd)
    os.unlink(probe)
    return CovarianceCache(root)

