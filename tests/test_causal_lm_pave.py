"""Streamed PAVE over causal-LM checkpoints == the in-memory PAVE with the same merger, data and settings."""

from __future__ import annotations

import copy

import pytest
import torch
from pave_helpers import make_pool
from transformers import AutoModelForCausalLM

import fusion_bench_pave.plugin  # noqa: F401  (compat repair before fusion_bench imports)
from fusion_bench_pave.causal_lm_skeleton import meta_causal_lm
from fusion_bench_pave.merging.checkpoint_merge import merge_causal_lm_checkpoints
from fusion_bench_pave.merging.stream import Dare, TaskArithmetic, Ties
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.calibration import iter_batches, sample_indices
from fusion_bench_pave.pave.causal_lm_purification import StreamedCollection, pave_merge_causal_lm_checkpoints
from fusion_bench_pave.pave.purification import PurifySettings

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
TIES = {"_target_": "fusion_bench.method.TiesMergingAlgorithm", "scaling_factor": 0.7, "threshold": 20,
        "remove_keys": [], "merge_func": "sum"}
STREAMED = {"TA": TaskArithmetic(0.3), "TIES": Ties(0.7, 20)}
MERGERS = {"TA": TA, "TIES": TIES}
COLLECT = dict(num_samples=12, batch_size=4, eps0=0.01, cache_dir=None, report_extras=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The tiny Mistral pool of the PAVE tests, saved as sharded safetensors checkpoints."""
    pool = make_pool("mistral")
    root = tmp_path_factory.mktemp("pave_family")
    paths = {}
    for name in pool.all_model_names:
        paths[name] = root / name
        pool.load_model(name).save_pretrained(paths[name], max_shard_size="40KB")
    pool.load_tokenizer().save_pretrained(paths["_pretrained_"])
    return pool, paths


def calibration(pool, paths, tasks=None) -> dict:
    """Each task's batches as the in-memory PAVE builds them (same sample, tokenizer and settings)."""
    skeleton = meta_causal_lm(AutoModelForCausalLM.from_pretrained(paths["_pretrained_"]).config)
    out = {}
    for task in tasks or pool.model_names:
        data = pool.load_train_dataset(task)
        indices = sample_indices(len(data), COLLECT["num_samples"], 42, task)
        out[task] = list(iter_batches(data, indices, pool.load_tokenizer(), skeleton, task, batch_size=4))
    return out


def streamed(pool, paths, out, method, settings, **kwargs):
    tasks = kwargs.pop("tasks", None)
    pave_merge_causal_lm_checkpoints(
        paths["_pretrained_"], {task: paths[task] for task in pool.model_names}, out, method,
        calibration(pool, paths, tasks), settings,
        collection=StreamedCollection(include=lambda name, module: name != "lm_head"), progress=False, **kwargs)
    return AutoModelForCausalLM.from_pretrained(out)


def in_memory(pool, merger, **kwargs):
    return PAVE(merger=merger, **COLLECT, **kwargs).run(copy.deepcopy(pool))


def assert_bit_equal(got, want) -> None:
    # Bit-equal: the statistics are bit-equal to the whole-model collection (test_causal_lm_statistics),
    # each layer's purification runs the same pure functions on the same tensors (uniform and per_layer
    # ranks depend on one layer's spectra), and the streamed merges are bit-equal to FusionBench's.
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    assert not [key for key in b if not torch.equal(a[key], b[key])]


@pytest.mark.parametrize("allocation", ["uniform", "per_layer"])
@pytest.mark.parametrize("merger", ["TA", "TIES"])
def test_streamed_pave_equals_in_memory_pave(family, tmp_path, allocation, merger):
    pool, paths = family
    expected = in_memory(pool, MERGERS[merger], rho=0.75, allocation=allocation)
    got = streamed(pool, paths, tmp_path / "out", STREAMED[merger], PurifySettings(rho=0.75, allocation=allocation, eps0=0.01))
    assert_bit_equal(got, expected)
    plain = merge_causal_lm_checkpoints(paths["_pretrained_"], [paths[t] for t in pool.model_names], tmp_path / "plain",
                                        STREAMED[merger], progress=False)
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(got.get_parameter(key), AutoModelForCausalLM.from_pretrained(plain).get_parameter(key))


def test_streamed_task_vector_target_equals_in_memory(family, tmp_path):
    pool, paths = family
    expected = in_memory(pool, TA, rho=0.75, allocation="uniform", purify_target="task_vector")
    got = streamed(pool, paths, tmp_path / "out", STREAMED["TA"],
                   PurifySettings(rho=0.75, allocation="uniform", eps0=0.01, purify_target="task_vector"))
    assert_bit_equal(got, expected)
    paper = in_memory(pool, TA, rho=0.75, allocation="uniform")
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(got.get_parameter(key), paper.get_parameter(key))


def test_dare_before_purification_and_purify_tasks(family, tmp_path):
    pool, paths = family
    dare = {"sparsity_ratio": 0.5, "rescale": True, "only_on_linear_weights": False}
    expected = in_memory(pool, TIES, rho=0.75, allocation="uniform", dare=dare, seed=42, purify_tasks=["task0", "task2"])
    got = streamed(pool, paths, tmp_path / "out", STREAMED["TIES"], PurifySettings(rho=0.75, allocation="uniform", eps0=0.01),
                   dare=Dare(0.5, seed=42), tasks=["task0", "task2"])
    assert_bit_equal(got, expected)


@pytest.mark.parametrize("merger", ["TA", "TIES"])
def test_rho_one_is_the_plain_streamed_merge(family, tmp_path, merger):
    pool, paths = family
    got = streamed(pool, paths, tmp_path / "pave", STREAMED[merger], PurifySettings(rho=1.0, allocation="uniform", eps0=0.01))
    plain = merge_causal_lm_checkpoints(paths["_pretrained_"], [paths[t] for t in pool.model_names], tmp_path / "plain",
                                        STREAMED[merger], progress=False)
    assert_bit_equal(got, AutoModelForCausalLM.from_pretrained(plain))


@pytest.mark.parametrize("allocation", ["uniform", "per_layer"])
def test_uniform_holds_one_model_at_a_time_per_layer_advances_in_lockstep(family, tmp_path, monkeypatch, allocation):
    from fusion_bench_pave.pave import causal_lm_statistics

    pool, paths = family
    loads: list[tuple[str, str]] = []  # (checkpoint, module prefix) of every decoder layer given weights
    load = causal_lm_statistics.load_module_

    def tracked(module, prefix, checkpoint, *args, **kwargs):
        if ".layers." in prefix:
            loads.append((checkpoint.path, prefix))
        return load(module, prefix, checkpoint, *args, **kwargs)

    monkeypatch.setattr(causal_lm_statistics, "load_module_", tracked)
    streamed(pool, paths, tmp_path / "out", STREAMED["TA"], PurifySettings(rho=0.75, allocation=allocation, eps0=0.01))
    checkpoints = [checkpoint for checkpoint, _ in loads]
    switches = sum(a != b for a, b in zip(checkpoints, checkpoints[1:]))
    layers = pool.load_pretrained_model().config.num_hidden_layers
    # uniform: task after task; per_layer: every task's layer i before any task's layer i + 1
    assert switches == (len(pool.model_names) - 1 if allocation == "uniform" else len(loads) - 1)
    assert len(loads) == layers * len(pool.model_names)
