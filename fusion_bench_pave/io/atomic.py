"""Atomic outputs: every file or directory this package writes appears complete or not at all.

Work happens in a staging sibling (same filesystem, so the final ``os.replace`` is atomic) whose
name records the writer: ``.<name>.tmp-<host>-<pid>-<random>``. A run killed mid-write leaves only
such a hidden sibling, never a half-written target, and the next write to the same target removes
the siblings of writers on this host that are gone (a shared filesystem's other hosts are left
alone: their pids mean nothing here).

Every directory written here carries a manifest, ``.fusion_bench_pave-manifest.json``: the relative
path and size of each file in it. ``overwrite=True`` replaces a directory only if it holds nothing but
the files its manifest lists, at their recorded sizes (so it never deletes files someone else put
there); otherwise it refuses, naming the foreign or changed files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

#: Test hook: when set to a target's file name, the writer stops itself (SIGSTOP) with that target's
#: staging file or directory fully written but not yet renamed, so a test can kill a save there.
PAUSE_ENV = "FUSION_BENCH_PAVE_PAUSE_IN_STAGING"
#: The file in every directory written by ``atomic_output_dir`` that lists what it wrote there.
MANIFEST = ".fusion_bench_pave-manifest.json"


def _staging_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _writer_prefix(path: Path, tag: str = "") -> str:
    """Staging-name prefix of this process; ``mkstemp``/``mkdtemp`` append a dash-free suffix."""
    return f"{_staging_prefix(path)}{socket.gethostname()}-{os.getpid()}-{tag}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(path: str | os.PathLike) -> list[Path]:
    """Delete the staging siblings of ``path`` left by writers on this host that no longer run."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.glob(_staging_prefix(path) + "*"):
        parts = entry.name[len(_staging_prefix(path)) :].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not _pid_alive(pid):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """``FileExistsError`` if ``path`` exists and ``overwrite`` is false."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=true to replace it")


def _entries(directory: Path) -> dict[str, int]:
    """Relative POSIX path -> size of every file and symlink under ``directory`` (links not followed),
    the manifest left out."""
    entries = {}
    for root, dirs, files in os.walk(directory):
        base = Path(root)
        for name in [*files, *(d for d in dirs if (base / d).is_symlink())]:
            relative = (base / name).relative_to(directory).as_posix()
            if relative != MANIFEST:
                entries[relative] = (base / name).lstat().st_size
    return entries


def write_manifest(directory: Path) -> None:
    """Record every file now in ``directory`` (name and size) in its manifest."""
    (directory / MANIFEST).write_text(json.dumps({"files": _entries(directory)}, indent=1, sort_keys=True))


def _recorded(directory: Path) -> dict[str, int]:
    """The manifest's files; empty if it is missing or unreadable (then nothing counts as ours)."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return files if isinstance(files, dict) else {}


def foreign_files(directory: str | os.PathLike) -> list[str]:
    """Files under ``directory`` that its manifest does not list (``"name"``) or lists with another
    size (``"name (changed since written)"``), sorted."""
    recorded = _recorded(Path(directory))
    return sorted(
        name if name not in recorded else f"{name} (changed since written)"
        for name, size in _entries(Path(directory)).items()
        if recorded.get(name) != size
    )


def refuse_replacing_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """``FileExistsError`` unless the directory ``path`` may be (re)written: it is absent, or
    ``overwrite`` is true and it holds only files we wrote there (see the module docstring)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    refuse_existing(path, overwrite)
    if path.is_symlink() or not path.is_dir():
        kind = "a symlink" if path.is_symlink() else "a file"
        raise FileExistsError(
            f"{path} is {kind}, not a directory; overwrite=true replaces only directories fusion_bench_pave "
            "wrote: move or delete it yourself"
        )
    if foreign := foreign_files(path):
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise FileExistsError(
            f"{path} holds files fusion_bench_pave did not write there (not in its {MANIFEST}): {shown}; "
            "overwrite=true replaces only what we wrote: move those files out, or delete the directory yourself"
        )


def _prepare(path: str | os.PathLike, overwrite: bool, refuse=refuse_existing) -> Path:
    """Check ``path`` with ``refuse(path, overwrite)``, create its parent, and clear dead writers'
    staging beside it; returns ``path`` as a Path."""
    path = Path(path)
    refuse(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    return path


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", overwrite: bool = True, **open_kwargs: Any) -> Iterator[IO]:
    """Open (``os.fdopen(fd, mode, **open_kwargs)``) a staging file that replaces ``path`` (fsynced)
    only if the block succeeds.

    ``overwrite=False`` refuses an existing ``path``. On failure ``path`` keeps its old content.
    """
    path = _prepare(path, overwrite)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_writer_prefix(path))
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _maybe_pause(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (replacing any old file)."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def _maybe_pause(path: Path) -> None:
    if os.environ.get(PAUSE_ENV) == path.name:
        os.kill(os.getpid(), signal.SIGSTOP)


def publish_dir(staging: Path, path: Path, overwrite: bool) -> None:
    """Move the finished directory ``staging`` to ``path``; ``refuse_replacing_dir`` checks ``path``
    again first (it may have appeared or gained files since the write began).

    An existing ``path`` is first renamed aside, so a kill between the two renames leaves ``path``
    absent (never mixed); the old copy is then deleted."""
    _maybe_pause(path)
    refuse_replacing_dir(path, overwrite)
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=_writer_prefix(path, "old"), dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, path)


def make_staging_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check ``path`` (``refuse_replacing_dir``), create its parent, clear dead writers' staging and
    create this writer's staging sibling, which ``publish_dir`` later moves to ``path``."""
    path = _prepare(path, overwrite, refuse_replacing_dir)
    return Path(tempfile.mkdtemp(prefix=_writer_prefix(path), dir=path.parent))


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging sibling directory that replaces ``path`` (with a manifest of its files added)
    only if the block succeeds.

    Refuses an existing ``path`` unless ``overwrite`` and it holds only what we wrote
    (``refuse_replacing_dir``); a failure or kill leaves ``path`` untouched.
    """
    path, staging = Path(path), make_staging_dir(path, overwrite)
    try:
        yield staging
        write_manifest(staging)
        publish_dir(staging, path, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
