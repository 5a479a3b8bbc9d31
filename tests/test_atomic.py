"""fusion_bench_pave.atomic: targets appear whole or not at all; stale staging is cleaned up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from fusion_bench_pave.atomic import (
    atomic_file,
    atomic_output_dir,
    atomic_write_text,
    refuse_existing,
    remove_stale_staging,
)


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_file_is_written_whole_and_a_failure_keeps_the_old_content(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "old")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target, "w") as handle:
            handle.write("new, half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert listing(target.parent) == ["report.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_file_refuses_an_existing_target_without_overwrite(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match=r"a\.bin already exists; pass overwrite=true"):
        with atomic_file(target, overwrite=False) as handle:
            handle.write(b"x")
    assert target.read_bytes() == b"keep"


def test_dir_refuses_replaces_and_rolls_back(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as staging:
        (staging / "w").write_text("1")
    assert listing(tmp_path) == ["out"] and (target / "w").read_text() == "1"
    with pytest.raises(FileExistsError, match="out already exists"):
        with atomic_output_dir(target):
            pytest.fail("the block must not run when the target exists")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(target, overwrite=True) as staging:
            (staging / "w").write_text("half")
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["out"] and listing(target) == ["w"] and (target / "w").read_text() == "1"
    with atomic_output_dir(target, overwrite=True) as staging:
        (staging / "v").write_text("2")
    assert listing(tmp_path) == ["out"] and listing(target) == ["v"]


def test_staging_of_dead_writers_on_this_host_is_removed_and_others_are_kept(tmp_path):
    target, host = tmp_path / "model", socket.gethostname()
    dead, live = dead_pid(), os.getppid()
    (tmp_path / f".model.tmp-{host}-{dead}-abc").mkdir()
    (tmp_path / f".model.tmp-{host}-{dead}-olddef").write_text("partial")
    kept = [f".model.tmp-{host}-{live}-ghi", f".model.tmp-other-host-{dead}-jkl", f".other.tmp-{host}-{dead}-mno"]
    for name in kept:
        (tmp_path / name).mkdir()
    removed = sorted(p.name for p in remove_stale_staging(target))
    assert removed == [f".model.tmp-{host}-{dead}-abc", f".model.tmp-{host}-{dead}-olddef"]
    assert listing(tmp_path) == sorted(kept)
    (tmp_path / f".model.tmp-{host}-{dead}-abc").mkdir()
    with atomic_output_dir(target) as staging:  # every write cleans up first
        assert staging.name.startswith(f".model.tmp-{host}-{os.getpid()}-")
        (staging / "w").write_text("1")
    assert listing(tmp_path) == sorted([*kept, "model"])


def test_refuse_existing_accepts_missing_paths_and_overwrite(tmp_path):
    refuse_existing(tmp_path / "missing", overwrite=False)
    refuse_existing(tmp_path, overwrite=True)
    with pytest.raises(FileExistsError):
        refuse_existing(tmp_path, overwrite=False)
