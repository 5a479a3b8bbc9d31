"""Covariance statistics on disk: the safetensors statistics file, the lazy covariance cache, and
PAVE's covariance_offload, which must purify bit for bit like the in-memory path."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from pave_helpers import make_pool
from safetensors import safe_open
from safetensors.torch import save_file

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench_pave.io.atomic import atomic_file
from fusion_bench_pave.io.fingerprint import cache_key, canonical
from fusion_bench_pave.io.safetensors import LazyTensors, write_tensors
from fusion_bench_pave.io.statistics import load_stats, save_stats
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave import purification
from fusion_bench_pave.pave.cache import CovarianceCache
from fusion_bench_pave.pave.covariance import CovarianceStats
from fusion_bench_pave.pave.offload import SPILL_PREFIX, CovarianceOffload, goes_to_disk

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
TIES = {
    "_target_": "fusion_bench.method.TiesMergingAlgorithm",
    "scaling_factor": 0.7, "threshold": 20, "remove_keys": [], "merge_func": "sum",
}
PURIFY = PAVE.purify_


def pave(**kwargs) -> PAVE:
    return PAVE(**{"merger": TA, "rho": 0.75, "num_samples": 12, "batch_size": 4, "eps0": 0.01, **kwargs})


def random_stats(seed: int = 0, dtype: torch.dtype = torch.float64) -> CovarianceStats:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(50, 6, generator=generator, dtype=dtype), torch.randn(50, 9, generator=generator, dtype=dtype)
    return CovarianceStats(
        xtx={"enc.q": x.T @ x, "enc.fc2": y.T @ y},
        count={"enc.q": 50, "enc.fc2": 47},
        input_of={"enc.q": "enc.q", "enc.k": "enc.q", "enc.fc2": "enc.fc2"},
    )


def write(path, stats: CovarianceStats, metadata=None) -> None:
    with open(path, "wb") as handle:
        save_stats(handle, stats, metadata)


# ------------------------------------------------------------------ statistics file
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_statistics_file_round_trip_is_exact_and_lazy(tmp_path, dtype):
    stats = random_stats(dtype=dtype)
    write(tmp_path / "s.safetensors", stats, {"note": "x"})
    loaded, metadata = load_stats(tmp_path / "s.safetensors")
    assert isinstance(loaded.xtx, LazyTensors) and metadata == {"note": "x"}
    assert loaded.count == stats.count and loaded.input_of == stats.input_of
    assert list(loaded.xtx) == ["enc.q", "enc.fc2"] and loaded.xtx.nbytes == (36 + 81) * dtype.itemsize
    for key, value in stats.xtx.items():
        read = loaded.xtx[key]
        assert read.dtype == dtype and torch.equal(read, value)
        read.add_(1)  # each lookup is a fresh tensor: writing to it changes neither the file nor a later read
        assert torch.equal(loaded.xtx[key], value)
    assert torch.equal(loaded.covariance("enc.k"), stats.covariance("enc.k"))


def test_statistics_file_is_plain_safetensors(tmp_path):
    stats = random_stats()
    write(tmp_path / "ours.safetensors", stats)
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:  # the library reads ours
        assert json.loads(f.metadata()["count"]) == stats.count
        for key, value in stats.xtx.items():
            assert torch.equal(f.get_tensor(key), value)
    tensors = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(5), "empty": torch.zeros(0, 2)}
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"k": "v"})
    lazy = LazyTensors(tmp_path / "theirs.safetensors")  # we read the library's
    assert lazy.metadata == {"k": "v"} and sorted(lazy) == ["a", "b", "empty"]
    for key, value in tensors.items():
        assert torch.equal(lazy[key], value)
    with pytest.raises(ValueError, match="format None"):  # but it is no statistics file
        load_stats(tmp_path / "theirs.safetensors")


def test_a_lazy_reader_keeps_the_file_it_opened(tmp_path):
    path = tmp_path / "s.safetensors"
    write(path, random_stats(1))
    loaded, _ = load_stats(path)
    with atomic_file(path, "wb") as handle:  # replaced on disk (as a concurrent cache writer would)
        save_stats(handle, random_stats(2))
    assert torch.equal(loaded.xtx["enc.q"], random_stats(1).xtx["enc.q"])
    os.remove(path)
    assert torch.equal(loaded.xtx["enc.fc2"], random_stats(1).xtx["enc.fc2"])
    loaded.xtx.close()
    with pytest.raises(ValueError):
        loaded.xtx["enc.q"]


def test_truncated_or_foreign_files_are_rejected(tmp_path):
    path = tmp_path / "s.safetensors"
    write(path, random_stats())
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        LazyTensors(path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="not a safetensors file"):
        LazyTensors(path)
    with pytest.raises(ValueError, match=r"metadata keys \['count'\] are reserved"):
        write(path, random_stats(), {"count": "1"})
    with open(path, "wb") as handle, pytest.raises(TypeError, match="torch.complex128"):
        write_tensors(handle, {"z": torch.zeros(3, dtype=torch.complex128)}, {})


# --------------------------------------------------------------------------- cache
def test_cache_round_trip_is_lazy_and_exact(tmp_path):
    cache, parts = CovarianceCache(tmp_path), {"model": "abc", "exclude": ("head",), "num_rows": None}
    stats = random_stats()
    path = cache.save(parts, stats)
    assert path.name == f"pave_cov_v3_{cache_key(parts)}.safetensors"
    loaded = cache.load(parts)
    assert isinstance(loaded.xtx, LazyTensors)
    assert loaded.count == stats.count and loaded.input_of == stats.input_of
    assert loaded.xtx.keys() == stats.xtx.keys()
    for key, value in stats.xtx.items():
        assert torch.equal(loaded.xtx[key], value)
    assert cache.load({**parts, "model": "abd"}) is None
    _, metadata = load_stats(path)
    assert json.loads(metadata["parts"]) == canonical(parts) == {"model": "abc", "exclude": ["head"], "num_rows": None}


def test_an_old_format_pt_cache_entry_is_ignored(tmp_path, monkeypatch):
    """A version-1 file (torch.save of a dict, `pave_cov_<key>.pt`) with the right key and wrong
    numbers: a run must recollect (no hit) and give the numbers of a run without any cache."""
    fresh = pave(cache_dir=str(tmp_path / "fresh")).run(make_pool("clip"))["model"]
    old = tmp_path / "old"
    old.mkdir()
    keys = []
    original = CovarianceCache.load

    def record_and_plant(self, parts):
        key = cache_key(parts)
        keys.append(key)
        stats = random_stats()
        torch.save({"parts": canonical(parts), "xtx": {k: v * 0 for k, v in stats.xtx.items()}, "count": stats.count,
                    "input_of": stats.input_of}, old / f"pave_cov_{key}.pt")
        return original(self, parts)

    monkeypatch.setattr(CovarianceCache, "load", record_and_plant)
    result = pave(cache_dir=str(old)).run(make_pool("clip"))
    assert len(keys) == 6 and result["pave"]["covariance_cache_hits"] == 0  # load before and after each save
    assert sorted(p.suffix for p in old.iterdir()) == [".pt"] * 3 + [".safetensors"] * 3
    for key, value in fresh.state_dict().items():
        assert torch.equal(result["model"].state_dict()[key], value), key


# ------------------------------------------------------------------------- offload
def test_auto_goes_to_disk_once_the_projected_size_exceeds_the_threshold():
    assert not goes_to_disk("auto", 2**28, 4)  # exactly 1 GiB stays in memory
    assert goes_to_disk("auto", 2**28 + 1, 4)
    assert goes_to_disk("auto", 2**28, 5)
    assert goes_to_disk("disk", 1, 1) and not goes_to_disk("memory", 2**40, 8)
    offload = CovarianceOffload("auto", num_tasks=3, threshold=3 * (36 + 81) * 8 - 1)
    with offload:
        kept = offload.keep(random_stats())  # 3 x 936 bytes > threshold: the first task decides for all
        assert offload.on_disk and isinstance(kept.xtx, LazyTensors)
        assert torch.equal(kept.xtx["enc.fc2"], random_stats().xtx["enc.fc2"])
        spill = offload.spill_dir
        assert sorted(p.name for p in spill.iterdir()) == ["task0.safetensors"]
    assert not spill.exists()
    with CovarianceOffload("auto", num_tasks=3, threshold=3 * (36 + 81) * 8) as offload:
        assert offload.keep(random_stats()).xtx.__class__ is dict and not offload.on_disk
        assert offload.spill_dir is None


@pytest.fixture
def spill_root(tmp_path, monkeypatch):
    """TMPDIR of this test, so its spill directories can be seen and counted."""
    root = tmp_path / "tmpdir"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def run_recording(algorithm: PAVE, spill_root, monkeypatch) -> tuple[dict, dict]:
    """Run PAVE on the tiny CLIP pool; return its result and what purify_ was given."""
    seen = {}

    def spy(self, finetuned, stats, *rest):
        seen["lazy"] = [isinstance(s.xtx, LazyTensors) for s in stats.values()]
        seen["spilled"] = sorted(p.name for p in spill_root.glob(f"{SPILL_PREFIX}*/*"))
        return PURIFY(self, finetuned, stats, *rest)

    monkeypatch.setattr(PAVE, "purify_", spy)
    return algorithm.run(make_pool("clip")), seen


@pytest.mark.parametrize("allocation, cached", [("per_layer", False), ("per_model", False), ("per_layer", True)])
def test_offload_to_disk_purifies_bit_for_bit_like_memory(tmp_path, spill_root, monkeypatch, allocation, cached):
    runs = {}
    for mode in ("memory", "disk"):
        cache = str(tmp_path / f"cache_{mode}") if cached else None
        algorithm = pave(merger=TIES if allocation == "per_layer" else TA, allocation=allocation,
                         covariance_offload=mode, cache_dir=cache)
        result, seen = run_recording(algorithm, spill_root, monkeypatch)
        runs[mode] = (result["model"].state_dict(), algorithm.extras, seen)
    (memory, memory_extras, memory_seen), (disk, disk_extras, disk_seen) = runs["memory"], runs["disk"]
    assert memory_seen["lazy"] == [False] * 3 and disk_seen["lazy"] == [True] * 3
    assert memory_seen["spilled"] == [] and memory_extras["covariance_offload"] == "memory"
    assert disk_extras["covariance_offload"] == "disk"
    assert disk_seen["spilled"] == ([] if cached else ["task0.safetensors", "task1.safetensors", "task2.safetensors"])
    assert list(spill_root.iterdir()) == []  # removed at the end of the run
    assert disk_extras["ranks"] == memory_extras["ranks"]
    assert min(r for ranks in disk_extras["ranks"].values() for r in ranks.values()) < 32  # something was dropped
    assert disk.keys() == memory.keys()
    for key, value in memory.items():
        assert torch.equal(disk[key], value), key


def test_spill_directory_is_removed_after_an_error_in_purification(spill_root, monkeypatch):
    spilled = []

    def failing_eigh(*args, **kwargs):
        spilled.extend(spill_root.glob(f"{SPILL_PREFIX}*/*"))
        raise RuntimeError("eigh failed")

    monkeypatch.setattr(purification, "context_eigh", failing_eigh)
    with pytest.raises(RuntimeError, match="eigh failed"):
        pave(covariance_offload="disk").run(make_pool("clip"))
    assert len(spilled) == 3 and all(p.suffix == ".safetensors" for p in spilled)
    assert list(spill_root.iterdir()) == []


def test_auto_keeps_small_statistics_in_memory_and_reads_cache_hits_fully(tmp_path, spill_root, monkeypatch):
    pave(cache_dir=str(tmp_path)).run(make_pool("clip"))
    result, seen = run_recording(pave(cache_dir=str(tmp_path)), spill_root, monkeypatch)
    assert result["pave"]["covariance_cache_hits"] == 3 and result["pave"]["covariance_offload"] == "memory"
    assert seen["lazy"] == [False] * 3 and seen["spilled"] == []
