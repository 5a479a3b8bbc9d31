"""fusion_bench_pave.io.atomic: targets appear whole or not at all; stale staging is cleaned up;
overwrite replaces only directories that hold nothing but what we wrote (their manifest)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from fusion_bench_pave.io.atomic import (
    MANIFEST,
    atomic_file,
    atomic_output_dir,
    atomic_write_text,
    refuse_existing,
    refuse_replacing_dir,
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
    assert listing(target) == [MANIFEST, "w"]
    with pytest.raises(FileExistsError, match="out already exists"):
        with atomic_output_dir(target):
            pytest.fail("the block must not run when the target exists")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(target, overwrite=True) as staging:
            (staging / "w").write_text("half")
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["out"] and listing(target) == [MANIFEST, "w"] and (target / "w").read_text() == "1"
    with atomic_output_dir(target, overwrite=True) as staging:
        (staging / "v").write_text("2")
    assert listing(tmp_path) == ["out"] and listing(target) == [MANIFEST, "v"]


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


# ------------------------------------------------ overwrite replaces only what we wrote


def write_dir(target, files: dict[str, str], overwrite: bool = False) -> None:
    with atomic_output_dir(target, overwrite=overwrite) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)


def test_the_manifest_lists_every_file_written_with_its_size(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as staging:
        (staging / "a.json").write_text("abc")
        (staging / "shards" / "empty").mkdir(parents=True)
        (staging / "shards" / "0.bin").write_bytes(b"\0" * 1000)
        (staging / "link").symlink_to("a.json")
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest == {"files": {"a.json": 3, "link": len("a.json"), "shards/0.bin": 1000}}
    write_dir(target, {"b": "1"}, overwrite=True)  # all ours (an empty folder holds nothing foreign)
    assert listing(target) == [MANIFEST, "b"]


def test_overwrite_refuses_a_directory_holding_foreign_files_and_keeps_them(tmp_path):
    target = tmp_path / "out"
    write_dir(target, {"config.json": "{}", "model.bin": "weights"})
    (target / "notes.txt").write_text("mine")
    (target / "plots").mkdir()
    (target / "plots" / "fig.png").write_text("png")
    (target / "config.json").write_text('{"edited": 1}')  # changed size: no longer what we wrote
    message = (rf"{target} holds files fusion_bench_pave did not write there \(not in its {MANIFEST}\): "
               r"config\.json \(changed since written\), notes\.txt, plots/fig\.png; overwrite=true replaces only "
               r"what we wrote: move those files out, or delete the directory yourself")
    with pytest.raises(FileExistsError, match=f"^{message}$"):
        write_dir(target, {"new": "x"}, overwrite=True)
    assert listing(target) == [MANIFEST, "config.json", "model.bin", "notes.txt", "plots"]
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.bin").read_text() == "weights"
    assert listing(tmp_path) == ["out"]  # no staging left behind
    (target / "notes.txt").unlink()
    shutil.rmtree(target / "plots")
    (target / "config.json").write_text("[]")  # same size as the "{}" we wrote: counted as ours
    (target / "model.bin").unlink()  # files of ours that are gone are no loss
    write_dir(target, {"new": "x"}, overwrite=True)
    assert listing(target) == [MANIFEST, "new"]


def test_overwrite_of_a_directory_without_manifest_names_all_its_files(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    for i in range(12):
        (target / f"f{i:02d}").write_text("x")
    with pytest.raises(FileExistsError, match=r"did not write there .*: f00, f01, .*, f09 and 2 more; overwrite=true"):
        refuse_replacing_dir(target, overwrite=True)
    (target / MANIFEST).write_text("{not json")
    with pytest.raises(FileExistsError, match=r"f00, f01, .*, f09 and 2 more"):
        refuse_replacing_dir(target, overwrite=True)
    for file in target.iterdir():
        file.unlink()
    write_dir(target, {"w": "1"}, overwrite=True)  # an empty directory holds nothing foreign
    assert listing(target) == [MANIFEST, "w"]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_overwrite_refuses_a_file_or_symlink_at_the_target(tmp_path, kind):
    target, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    write_dir(elsewhere, {"w": "1"})
    if kind == "file":
        target.write_text("data")
    else:
        target.symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match=rf"^{target} is a {kind}, not a directory; overwrite=true replaces only "
                                              r"directories fusion_bench_pave wrote: move or delete it yourself$"):
        write_dir(target, {"w": "2"}, overwrite=True)
    assert (target.read_text() == "data") if kind == "file" else (target.readlink() == elsewhere)
    assert (elsewhere / "w").read_text() == "1"


def test_files_that_appear_during_the_write_are_checked_again_before_publishing(tmp_path):
    target = tmp_path / "out"
    write_dir(target, {"w": "1"})
    with pytest.raises(FileExistsError, match=r"did not write there .*: late\.txt; overwrite=true"):
        with atomic_output_dir(target, overwrite=True) as staging:
            (staging / "w").write_text("2")
            (target / "late.txt").write_text("someone else's")
    assert listing(target) == [MANIFEST, "late.txt", "w"] and (target / "w").read_text() == "1"
    fresh = tmp_path / "fresh"
    with pytest.raises(FileExistsError, match=r"fresh already exists; pass overwrite=true"):
        with atomic_output_dir(fresh) as staging:  # another writer published first
            (staging / "w").write_text("mine")
            write_dir(fresh, {"w": "theirs"})
    assert (fresh / "w").read_text() == "theirs" and listing(tmp_path) == ["fresh", "out"]
