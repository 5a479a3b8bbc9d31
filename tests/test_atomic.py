"""fusion_bench_pave.atomic: targets appear whole or not at all; stale staging is cleaned up."""

from __future__ import annotations

import os
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


def test_staging_of_dead_writers_is_removed_and_live_ones_are_kept(tmp_path):
    target = tmp_path / "model"
    dead, live = dead_pid(), os.getppid()
    (tmp_path / f".model.tmp-{dead}-abc").mkdir()
    (tmp_path / f".model.tmp-{dead}-def").write_text("partial")
    (tmp_path / f".model.tmp-{live}-ghi").mkdir()
    (tmp_path / f".other.tmp-{dead}-jkl").mkdir()
    assert sorted(p.name for p in remove_stale_staging(target)) == [f".model.tmp-{dead}-abc", f".model.tmp-{dead}-def"]
    assert listing(tmp_path) == [f".model.tmp-{live}-ghi", f".other.tmp-{dead}-jkl"]
    (tmp_path / f".model.tmp-{dead}-abc").mkdir()
    with atomic_output_dir(target) as staging:  # every write cleans up first
        (staging / "w").write_text("1")
    assert listing(tmp_path) == [f".model.tmp-{live}-ghi", f".other.tmp-{dead}-jkl", "model"]


def test_refuse_existing_accepts_missing_paths_and_overwrite(tmp_path):
    refuse_existing(tmp_path / "missing", overwrite=False)
    refuse_existing(tmp_path, overwrite=True)
    with pytest.raises(FileExistsError):
        refuse_existing(tmp_path, overwrite=False)
