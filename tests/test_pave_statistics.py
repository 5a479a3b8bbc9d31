"""Statistics measured once (method=pave_statistics) and read by PAVE (statistics=<dir>): the same
merged model as collecting them, bit for bit; no calibration data needed; statistics of other models,
missing tasks or excluded Linears refused before any purification; the directory written atomically
in the same task-file format as the covariance cache."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pave_helpers import make_pool

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench import BaseModelPool
from fusion_bench.utils import instantiate
from fusion_bench_pave.io.atomic import MANIFEST
from fusion_bench_pave.io.fingerprint import fingerprint_state_dict
from fusion_bench_pave.io.statistics import DIRECTORY_FORMAT, DIRECTORY_INDEX
from fusion_bench_pave.pave import PAVE, PAVEStatistics
from fusion_bench_pave.pave.task_statistics import CollectionSettings

from conftest import compose_fusion_bench, run_fusion_bench
from test_atomic_kill import kill, staging_of, start, stopped, wait_until

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
COLLECT = {"num_samples": 12, "batch_size": 4}


def pave(**kwargs) -> PAVE:
    return PAVE(**{"merger": TA, "rho": 0.75, "eps0": 0.01, **COLLECT, **kwargs})


def write_statistics(path: Path, pool=None, **kwargs) -> Path:
    PAVEStatistics(output_dir=str(path), **{**COLLECT, **kwargs}).run(pool or make_pool("clip"))
    return path


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory) -> Path:
    return write_statistics(tmp_path_factory.mktemp("shared") / "stats")


@pytest.fixture(scope="module")
def calibrated():
    """PAVE's merged model with statistics collected in the run."""
    return pave().run(make_pool("clip"))["model"]


# ------------------------------------------------------------------------ the artifact
def test_the_index_records_what_each_task_file_was_made_from(stats_dir):
    index = json.loads((stats_dir / DIRECTORY_INDEX).read_text())
    assert index["format"] == DIRECTORY_FORMAT and sorted(index["tasks"]) == ["task0", "task1", "task2"]
    pool = make_pool("clip")
    for task, entry in index["tasks"].items():
        assert entry["model"] == fingerprint_state_dict(pool.load_model(task).state_dict())
        assert entry["dataset"].startswith(f"{task}:") and entry["preprocessor"] is not None
        assert (entry["num_samples"], entry["num_rows"], entry["dtype"], entry["mask_padding"], entry["split"],
                entry["padding"]) == (12, None, "float64", True, "train", "longest")
        assert entry["exclude"] == ["lm_head", "classifier", "score"]
        assert entry["rows"] and all(n == 12 * 17 for n in entry["rows"].values())  # 12 images x (16 patches + CLS)
    assert sorted(os.listdir(stats_dir)) == sorted([MANIFEST, DIRECTORY_INDEX, *(e["file"] for e in index["tasks"].values())])


def test_a_task_file_is_the_covariance_cache_entry_byte_for_byte(tmp_path, stats_dir):
    pave(cache_dir=str(tmp_path)).run(make_pool("clip"))
    cached = sorted(p.name for p in tmp_path.iterdir())
    index = json.loads((stats_dir / DIRECTORY_INDEX).read_text())["tasks"]
    assert cached == sorted(entry["file"] for entry in index.values())
    for name in cached:
        assert (tmp_path / name).read_bytes() == (stats_dir / name).read_bytes()


def test_an_existing_directory_is_refused_before_any_work_unless_overwrite(tmp_path, monkeypatch):
    target = write_statistics(tmp_path / "stats", seed=1)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(PAVEStatistics, "collection", property(lambda self: pytest.fail("collected")))
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=true"):
        write_statistics(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    write_statistics(target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} != before


WRITER = """
import sys
from pave_helpers import make_pool
from fusion_bench_pave.pave import PAVEStatistics
PAVEStatistics(output_dir=sys.argv[1], num_samples=8, batch_size=4, overwrite=True).run(make_pool("clip"))
"""


@pytest.mark.parametrize("old", [True, False], ids=["over-old-output", "fresh"])
def test_a_killed_write_leaves_the_old_directory_or_nothing(tmp_path, old):
    target = tmp_path / "stats"
    if old:
        write_statistics(target, seed=1)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if old else None
    proc = start(WRITER, str(target), pause=target.name)
    wait_until(proc, stopped(proc))
    (staging,) = staging_of(target)
    assert DIRECTORY_INDEX in os.listdir(staging)  # complete, not yet published
    kill(proc)
    if old:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    else:
        assert not target.exists()
    write_statistics(target, num_samples=8, overwrite=True)  # the rerun removes the dead writer's staging
    assert sorted(os.listdir(tmp_path)) == ["stats"]


# --------------------------------------------------------------------- PAVE reading it
def test_pave_from_the_directory_equals_pave_collecting_bit_for_bit(stats_dir, calibrated):
    result = pave(statistics=str(stats_dir)).run(make_pool("clip"))
    assert_same_model(result["model"], calibrated)
    assert result["pave"]["covariance_cache_hits"] == 0


def test_a_pool_without_calibration_data_or_preprocessor_works_with_the_directory(stats_dir, calibrated):
    bare = BaseModelPool({name: model for name, model in make_pool("clip")._models.items()})
    assert not bare._train_datasets and getattr(bare, "_processor", None) is None
    with pytest.raises(ValueError, match="task 'task0' has no calibration data"):
        pave().run(BaseModelPool(dict(bare._models)))
    assert_same_model(pave(statistics=str(stats_dir)).run(bare)["model"], calibrated)


def test_pave_reads_only_the_linears_it_purifies(tmp_path, stats_dir):
    """Statistics of every Linear serve a run that excludes some: the result is that of a run that
    collected only the Linears it purifies."""
    everything = write_statistics(tmp_path / "all", exclude_modules=[])
    narrow = {"exclude_modules": ["fc2"]}
    assert_same_model(pave(statistics=str(everything), **narrow).run(make_pool("clip"))["model"],
                      pave(**narrow).run(make_pool("clip"))["model"])


def refused_before_purification(monkeypatch, pool, match: str, **kwargs) -> None:
    monkeypatch.setattr(PAVE, "purify_", lambda *args: pytest.fail("purified"))
    with pytest.raises(ValueError, match=match):
        pave(**kwargs).run(pool)


def test_another_tasks_model_is_refused(monkeypatch, stats_dir):
    pool = make_pool("clip")
    pool._models["task1"] = pool._models["task2"]
    refused_before_purification(monkeypatch, pool, r"task 'task1': the statistics in .+ were collected on another model",
                                statistics=str(stats_dir))


def test_a_modified_weight_is_refused(monkeypatch, stats_dir):
    pool = make_pool("clip")
    with torch.no_grad():
        pool._models["task2"].encoder.layers[0].mlp.fc1.weight[0, 0] += 1e-3
    refused_before_purification(monkeypatch, pool, r"task 'task2': the statistics in .+ were collected on another model",
                                statistics=str(stats_dir))


def test_a_missing_task_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch):
    two = make_pool("clip", tasks=2)
    stats = write_statistics(tmp_path / "two", two)
    monkeypatch.setattr(type(two), "load_model", lambda *args, **kwargs: pytest.fail("loaded"))
    refused_before_purification(monkeypatch, make_pool("clip", tasks=3),
                                r"has no statistics of task\(s\) \['task2'\] \(it holds \['task0', 'task1'\]\)",
                                statistics=str(stats))


def test_a_linear_excluded_from_the_statistics_is_refused(tmp_path, monkeypatch):
    stats = write_statistics(tmp_path / "no_fc2", exclude_modules=["fc2"])
    refused_before_purification(
        monkeypatch, make_pool("clip"),
        r"task 'task0': Linear 'encoder.layers.0.mlp.fc2' needs statistics but .+ has none "
        r"of it \(collected with exclude_modules=\['fc2'\]\)", statistics=str(stats))


def test_a_conv1d_layer_excluded_from_the_statistics_is_refused(tmp_path, monkeypatch):
    """GPT-2's linear layers are transformers Conv1D: the check covers them like nn.Linear."""
    stats = write_statistics(tmp_path / "no_c_fc", make_pool("gpt2"), exclude_modules=["c_fc"])
    refused_before_purification(
        monkeypatch, make_pool("gpt2"), r"task 'task0': Linear 'transformer.h.0.mlp.c_fc' needs statistics",
        statistics=str(stats))


def test_a_directory_that_is_not_a_statistics_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"is not a statistics directory \(no statistics.json\)"):
        pave(statistics=str(tmp_path)).run(make_pool("clip"))


# ----------------------------------------------------------------------------- config
def test_the_yaml_mirrors_the_constructor_with_paves_collection_values():
    config = OmegaConf.to_container(compose_fusion_bench(["method=pave_statistics"]).method)
    pave_config = OmegaConf.to_container(compose_fusion_bench(["method=pave"]).method, resolve=False)
    keys = [p for p in inspect.signature(PAVEStatistics.__init__).parameters if p not in ("self", "kwargs")]
    assert list(config) == ["_target_", *keys]
    collection = [k for k in keys if k not in ("output_dir", "overwrite")]
    assert set(collection) <= set(pave_config) and {k: config[k] for k in collection} == {
        k: pave_config[k] for k in collection}
    assert set(collection) == set(CollectionSettings.__dataclass_fields__) - {"exclude", "split", "padding", "order", "attention"} | {
        "exclude_modules", "calibration_datasets", "calibration_split", "calibration_padding", "sample_order", "purify_attention"}


@pytest.mark.slow
def test_cli_writes_statistics_that_pave_reads_to_the_calibrated_result(tmp_path):
    out = tmp_path / "stats"
    run_fusion_bench(["method=pave_statistics", "modelpool=tiny_clip", "~taskpool", f"method.output_dir={out}",
                      "method.num_samples=16", f"path.log_dir={tmp_path / 'logs'}"], cwd=tmp_path)
    assert sorted(json.loads((out / DIRECTORY_INDEX).read_text())["tasks"]) == ["tiny_color", "tiny_shape", "tiny_stripes"]
    config = compose_fusion_bench(["modelpool=tiny_clip"]).modelpool
    settings = {"num_samples": 16, "batch_size": 16, "rho": 0.9}
    calibrated = pave(**settings).run(instantiate(config))["model"]
    from_dir = pave(**settings, statistics=str(out)).run(instantiate(config))["model"]
    assert_same_model(from_dir, calibrated)
