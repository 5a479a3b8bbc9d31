"""The covariance cache never serves wrong statistics: entries damaged in place fail their checksums
and are recomputed (or, found during purification, fail the run); a changed preprocessor misses;
an unusable cache_dir is warned about once and the run goes on without it."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pave_helpers import make_pool
from reference.tiny_models import tokenizer as word_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessor

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave import cache as pave_cache
from fusion_bench_pave.pave.calibration import preprocessor_fingerprint
from fusion_bench_pave.pave.covariance import CovarianceStats
from fusion_bench_pave.io.safetensors import LazyTensors
from fusion_bench_pave.io.statistics import load_stats, save_stats

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
PURIFY = PAVE.purify_


def pave(**kwargs) -> PAVE:
    return PAVE(**{"merger": TA, "rho": 0.75, "num_samples": 12, "batch_size": 4, "eps0": 0.01, **kwargs})


def run(pool=None, **kwargs) -> dict:
    return pave(**kwargs).run(pool or make_pool("clip"))


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def entries(cache_dir: Path) -> dict[str, Path]:
    """{task: cache file}, read from each entry's recorded key parts."""
    found = {}
    for path in sorted(cache_dir.glob("pave_cov_v3_*.safetensors")):
        with safe_open(path, "pt") as f:
            found[json.loads(f.metadata()["parts"])["dataset"].split(":")[0]] = path
    return found


def damage(path: Path) -> None:
    """Zero 64 bytes a third into the data section, in place: same size, valid header."""
    data = path.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    at = start + (len(data) - start) // 3
    assert data[at : at + 64] != bytes(64)
    with open(path, "r+b") as handle:
        handle.seek(at)
        handle.write(bytes(64))
    assert path.stat().st_size == len(data)


def tensors_unchecked(path: Path) -> dict[str, torch.Tensor]:
    """What the file holds, read by the safetensors library (which checks nothing)."""
    with safe_open(path, "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.fixture(scope="module")
def clean():
    """The merged model of a run without any cache."""
    return run()["model"]


# ------------------------------------------------------------------- statistics file
def test_every_read_is_checked_against_the_tensor_checksum(tmp_path):
    stats = CovarianceStats(xtx={"a": torch.randn(64, 64, dtype=torch.float64), "b": torch.randn(8, 8)},
                            count={"a": 5, "b": 5}, input_of={"a": "a", "b": "b"})
    path = tmp_path / "s.safetensors"
    with open(path, "wb") as handle:
        save_stats(handle, stats)
    loaded, _ = load_stats(path)
    loaded.xtx.verify()
    assert loaded.xtx.checked and torch.equal(loaded.xtx["a"], stats.xtx["a"])
    damage(path)  # the open reader sees the in-place change
    assert not torch.equal(tensors_unchecked(path)["a"], stats.xtx["a"])
    with pytest.raises(ValueError, match=r"s\.safetensors: tensor 'a' does not match its CRC-32 checksum"):
        loaded.xtx["a"]
    with pytest.raises(ValueError, match="does not match its CRC-32 checksum"):
        loaded.xtx.verify()
    assert torch.equal(loaded.xtx["b"], stats.xtx["b"])  # the undamaged tensor still reads


def test_a_statistics_file_without_checksums_is_refused(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({"a": torch.eye(3)}, path, metadata={"format": "pave-covariance-stats/2", "count": "{}", "input_of": "{}"})
    assert not LazyTensors(path).checked  # plain safetensors files are readable, unchecked
    with pytest.raises(ValueError, match=r"expected 'pave-covariance-stats/2' \(with checksums\)"):
        load_stats(path)


# --------------------------------------------------------------------------- damage
def test_a_damaged_entry_is_recomputed_with_a_warning_never_used(tmp_path, caplog, clean):
    first = run(cache_dir=str(tmp_path))
    files = entries(tmp_path)
    assert sorted(files) == ["task0", "task1", "task2"] and first["pave"]["covariance_cache_hits"] == 0
    assert_same_model(first["model"], clean)
    original = files["task1"].read_bytes()
    damage(files["task1"])
    with caplog.at_level(logging.WARNING):
        second = run(cache_dir=str(tmp_path))
    assert second["pave"]["covariance_cache_hits"] == 2  # task0 and task2 are intact
    warnings = [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()]
    assert len(warnings) == 1 and str(files["task1"]) in warnings[0] and "CRC-32" in warnings[0]
    assert_same_model(second["model"], clean)
    assert files["task1"].read_bytes() == original  # recollected and saved again, bit for bit
    assert run(cache_dir=str(tmp_path))["pave"]["covariance_cache_hits"] == 3


@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_damage_during_purification_is_never_half_used(tmp_path, monkeypatch, clean, offload):
    """Entries damaged after their check, while purification runs: in memory the checked copies are
    used (same result); on disk the first damaged read fails the run, which returns nothing, and
    the next run recomputes the entries."""
    run(cache_dir=str(tmp_path))

    def damaging_purify(self, finetuned, stats, *rest):
        for path in entries(tmp_path).values():
            damage(path)
        return PURIFY(self, finetuned, stats, *rest)

    monkeypatch.setattr(PAVE, "purify_", damaging_purify)
    pool = make_pool("clip")
    algorithm = pave(cache_dir=str(tmp_path), covariance_offload=offload)
    if offload == "memory":
        assert_same_model(algorithm.run(pool)["model"], clean)
    else:
        with pytest.raises(ValueError, match=r"pave_cov_v3_\w+\.safetensors: tensor '.+' does not match its CRC-32"):
            algorithm.run(pool)
        assert algorithm.extras == {}  # nothing reported
    assert_same_model(pool.load_model("task0"), make_pool("clip").load_model("task0"))  # the pool is untouched
    monkeypatch.undo()
    again = run(cache_dir=str(tmp_path))
    assert again["pave"]["covariance_cache_hits"] == 0
    assert_same_model(again["model"], clean)


# ---------------------------------------------------------------------- preprocessor
def clip_processor(**changes) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **changes)


def with_preprocessor(pool, preprocessor):
    pool._preprocessor_object = preprocessor
    if pool.kind == "image":
        pool._processor = preprocessor
    return pool


def test_a_changed_image_processor_misses_the_cache(tmp_path):
    first = run(cache_dir=str(tmp_path))["model"]
    same = run(with_preprocessor(make_pool("clip"), clip_processor()), cache_dir=str(tmp_path))
    assert same["pave"]["covariance_cache_hits"] == 3  # an equal processor (another object) hits
    changed = run(with_preprocessor(make_pool("clip"), clip_processor(image_mean=[0.5, 0.5, 0.5])), cache_dir=str(tmp_path))
    assert changed["pave"]["covariance_cache_hits"] == 0 and len(entries(tmp_path)) == 3
    assert len(list(tmp_path.glob("pave_cov_v3_*"))) == 6
    oracle = run(with_preprocessor(make_pool("clip"), clip_processor(image_mean=[0.5, 0.5, 0.5])))["model"]
    assert_same_model(changed["model"], oracle)
    merged = changed["model"].state_dict()
    assert any(not torch.equal(value, merged[key]) for key, value in first.state_dict().items())  # it matters


def test_a_changed_tokenizer_misses_the_cache(tmp_path):
    assert run(make_pool("t5"), cache_dir=str(tmp_path))["pave"]["covariance_cache_hits"] == 0
    assert run(make_pool("t5"), cache_dir=str(tmp_path))["pave"]["covariance_cache_hits"] == 3
    left = word_tokenizer()
    left.padding_side = "left"
    assert run(with_preprocessor(make_pool("t5"), left), cache_dir=str(tmp_path))["pave"]["covariance_cache_hits"] == 0


def test_another_batch_size_misses_the_cache(tmp_path):
    """With padding rows counted (the official GLUE calibration), batches padded to their longest text
    give other statistics at another batch size: the TA (16) and EMR (64) GLUE presets share a cache."""
    settings = {"cache_dir": str(tmp_path), "mask_padding": False}
    assert run(make_pool("t5"), **settings)["pave"]["covariance_cache_hits"] == 0
    assert run(make_pool("t5"), **settings)["pave"]["covariance_cache_hits"] == 3
    other = run(make_pool("t5"), **settings, batch_size=6)
    assert other["pave"]["covariance_cache_hits"] == 0
    assert_same_model(other["model"], run(make_pool("t5"), mask_padding=False, batch_size=6)["model"])


def test_the_preprocessor_fingerprint_is_its_content_not_its_path(tmp_path):
    for preprocessor, load in [(word_tokenizer(), AutoTokenizer.from_pretrained),
                               (clip_processor(), AutoImageProcessor.from_pretrained)]:
        preprocessor.save_pretrained(tmp_path / "a")
        preprocessor.save_pretrained(tmp_path / "elsewhere" / "b")
        a, b = load(str(tmp_path / "a")), load(str(tmp_path / "elsewhere" / "b"))
        assert preprocessor_fingerprint(a) == preprocessor_fingerprint(b) is not None
    used = word_tokenizer()
    before = preprocessor_fingerprint(used)
    used(["w1 w2 w3", "w4"], padding=True, truncation=True, max_length=2)  # sets the backend's padding/truncation
    assert preprocessor_fingerprint(used) == before
    other_vocab = word_tokenizer()
    other_vocab.add_tokens(["w40"])
    assert preprocessor_fingerprint(other_vocab) != preprocessor_fingerprint(word_tokenizer())
    assert preprocessor_fingerprint(clip_processor(do_center_crop=False)) != preprocessor_fingerprint(clip_processor())
    assert preprocessor_fingerprint(lambda *args, **kwargs: None) is None


def test_an_unfingerprintable_preprocessor_is_not_cached(tmp_path, caplog):
    pool = make_pool("clip")
    processor = pool._preprocessor_object
    with_preprocessor(pool, lambda *args, **kwargs: processor(*args, **kwargs))
    assert run(pool, cache_dir=str(tmp_path))["pave"]["covariance_cache_hits"] == 0
    assert list(tmp_path.iterdir()) == []
    warnings = [r.getMessage() for r in caplog.records if "fingerprint" in r.getMessage()]
    assert warnings == ["cannot fingerprint the preprocessor (function); the covariance cache is not used in this run."]


# ------------------------------------------------------------------ unusable cache_dir
def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cache_dir" in r.getMessage()]


def test_a_cache_dir_that_is_a_file_warns_once_before_any_work_and_runs_without_it(tmp_path, caplog, clean):
    file = tmp_path / "cache"
    file.write_text("not a directory")
    with caplog.at_level(logging.INFO):
        result = run(cache_dir=str(file))
    assert cache_warnings(caplog) == [
        f"PAVE covariance cache_dir {file} cannot be used ({file} is a file, not a directory); running WITHOUT the cache."
    ]
    messages = [r.getMessage() for r in caplog.records]
    first_work = next(i for i, m in enumerate(messages) if "covariance statistics kept" in m)
    assert messages.index(cache_warnings(caplog)[0]) < first_work
    assert file.read_text() == "not a directory"
    assert result["pave"]["covariance_cache_hits"] == 0
    assert_same_model(result["model"], clean)


def test_a_read_only_cache_dir_is_read_not_written(tmp_path, caplog, monkeypatch, clean):
    run(cache_dir=str(tmp_path))
    files = sorted(tmp_path.iterdir())

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    if os.geteuid() == 0:  # root writes into a mode-0555 directory anyway
        monkeypatch.setattr(pave_cache, "tempfile", SimpleNamespace(mkstemp=read_only))
    tmp_path.chmod(0o555)
    try:
        hit = run(cache_dir=str(tmp_path))
        miss = run(cache_dir=str(tmp_path), num_samples=8)
    finally:
        tmp_path.chmod(0o755)
    assert hit["pave"]["covariance_cache_hits"] == 3 and miss["pave"]["covariance_cache_hits"] == 0
    assert_same_model(hit["model"], clean)
    assert_same_model(miss["model"], run(num_samples=8)["model"])
    assert sorted(tmp_path.iterdir()) == files  # nothing saved, no staging left
    warnings = cache_warnings(caplog)
    assert len(warnings) == 2 and all("is not writable" in w and "NOT saved" in w for w in warnings)  # one per run
