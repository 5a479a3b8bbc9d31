"""Directories written together by the ranks of a Lightning Fabric run (on a filesystem they share).

``shared_atomic_output_dir`` is ``io.atomic.atomic_output_dir`` for many writers: rank 0 checks the
target (refuse-overwrite rules unchanged) and creates the staging directory, every rank writes its
part into it, and rank 0 publishes it only if every rank's part succeeded; a failure on any rank
raises on every rank and leaves the target untouched. ``shared_temporary_dir``: one scratch
directory for all ranks, removed after the last of them is done with it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fusion_bench_pave.io.atomic import atomic_output_dir, make_staging_dir, publish_dir, write_manifest
from fusion_bench_pave.ranks import raise_if_any_failed, rank_and_size


def _shared_dir(fabric: Any, create) -> Path:
    """``create()`` on rank 0, its path broadcast; every rank checks that it sees the directory."""
    rank = fabric.global_rank
    made, error = None, None
    if rank == 0:
        try:
            made = str(create())
        except Exception as caught:  # noqa: BLE001 (told to every rank below)
            error = caught
    raise_if_any_failed(fabric, error, "creating the shared directory")
    path = Path(fabric.broadcast(made, src=0))
    seen = None if path.is_dir() else FileNotFoundError(
        f"rank {rank} does not see {path}, created by rank 0: the output must be on a filesystem every rank shares")
    raise_if_any_failed(fabric, seen, f"opening {path}")
    return path


@contextmanager
def shared_atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, fabric: Any | None = None) -> Iterator[Path]:
    """Yield, on every rank, one staging directory that replaces ``path`` once every rank's block succeeded."""
    if rank_and_size(fabric)[1] == 1:
        with atomic_output_dir(path, overwrite) as staging:
            yield staging
        return
    path = Path(path)
    staging = _shared_dir(fabric, lambda: make_staging_dir(path, overwrite))
    try:
        error = None
        try:
            yield staging
        except Exception as caught:  # noqa: BLE001 (re-raised by raise_if_any_failed)
            error = caught
        raise_if_any_failed(fabric, error, f"writing {path}")
        published = None
        if fabric.global_rank == 0:
            try:
                write_manifest(staging)
                publish_dir(staging, path, overwrite)
            except Exception as caught:  # noqa: BLE001
                published = caught
        raise_if_any_failed(fabric, published, f"publishing {path}")
    finally:
        if fabric.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def shared_temporary_dir(fabric: Any | None = None, prefix: str | None = None,
                         dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temporary directory (``tempfile``'s ``prefix`` and ``dir``) every rank uses, removed (by rank 0)
    when all ranks have left the block."""
    if rank_and_size(fabric)[1] == 1:
        with tempfile.TemporaryDirectory(prefix=prefix, dir=dir) as scratch:
            yield Path(scratch)
        return
    scratch = _shared_dir(fabric, lambda: tempfile.mkdtemp(prefix=prefix, dir=dir))
    try:
        yield scratch
    finally:
        fabric.barrier()
        if fabric.global_rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
