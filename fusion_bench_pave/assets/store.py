"""Where zoos live and how they are built: once, in a temporary sibling directory, renamed into
place under a file lock, so concurrent runs (pytest workers, multirun jobs) never see a half-built
zoo and a killed build leaves nothing that looks complete."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from fusion_bench_pave.io.atomic import atomic_output_dir

COMPLETE = "COMPLETE"


def cache_root() -> Path:
    """``$FUSION_BENCH_PAVE_CACHE`` or ``~/.cache/fusion_bench_pave``."""
    return Path(os.environ.get("FUSION_BENCH_PAVE_CACHE", Path.home() / ".cache" / "fusion_bench_pave"))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None], stamp: str) -> Path:
    """Return ``target``, first running ``build(staging_dir)`` and renaming the result to ``target``
    if ``target/COMPLETE`` is missing. ``stamp`` is written to ``COMPLETE`` last. A killed build leaves
    only its staging directory; an incomplete directory at ``target`` is replaced if it holds only files
    we wrote (its manifest says so), else refused with the foreign files named (see ``atomic``)."""
    if (target / COMPLETE).exists():
        return target
    with locked(target.parent / f".{target.name}.lock"):
        if (target / COMPLETE).exists():
            return target
        with atomic_output_dir(target, overwrite=True) as staging:
            build(staging)
            (staging / COMPLETE).write_text(stamp)
    return target
