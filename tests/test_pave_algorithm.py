"""PAVE FusionBench algorithm on tiny in-process pools: FusionBench's own methods as oracles."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from lightning import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from pave_helpers import PoolRecordingMerger, make_pool
from torch import nn

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench import BaseModelPool
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.method.dare import DareTiesMerging
from fusion_bench.method.emr_merging import EMRMerging
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave import task_statistics
from fusion_bench_pave.pave import cache as pave_cache
from fusion_bench_pave.pave.purify import context_svd, purify_weight
from fusion_bench_pave.pave.regularize import regularize_doubling

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
TIES = {
    "_target_": "fusion_bench.method.TiesMergingAlgorithm",
    "scaling_factor": 0.7,
    "threshold": 20,
    "remove_keys": [],
    "merge_func": "sum",
}


def pave(merger: dict = TA, **kwargs) -> PAVE:
    kwargs = {"rho": 1.0, "num_samples": 12, "batch_size": 4, "eps0": 0.01, **kwargs}
    return PAVE(merger=merger, **kwargs)


def model_of(result) -> nn.Module:
    return result["model"] if isinstance(result, dict) else result


def assert_state_dicts_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------- rho = 1 is the base method
@pytest.mark.parametrize("kind", ["clip", "t5", "mistral"])
def test_rho_one_reproduces_task_arithmetic_bit_for_bit(kind):
    merged = model_of(pave(TA).run(make_pool(kind)))
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(make_pool(kind))
    assert_state_dicts_equal(merged, oracle)


def test_a_declared_user_merger_runs_after_pave_and_an_undeclared_one_is_refused():
    own = {"_target_": "pave_helpers.OwnTaskArithmetic", "scaling_factor": 0.3}
    merged = model_of(pave(own).run(make_pool("clip")))
    assert_state_dicts_equal(merged, TaskArithmeticAlgorithm(scaling_factor=0.3).run(make_pool("clip")))
    with pytest.raises(ValueError, match=r"UndeclaredMerger' does not merge the fine-tuned models.*merges_task_vectors = True"):
        pave({**own, "_target_": "pave_helpers.UndeclaredMerger"}).run(make_pool("clip"))


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_the_merger_gets_the_users_pool_with_the_purified_models(kind):
    """Data-dependent mergers need the pool's datasets and preprocessor: the nested merger gets the
    user's pool (its class, same train splits, same preprocessor) holding the purified models; the
    CLI test on the tiny Mistral pool covers a pool class whose load_model only instantiates configs."""
    pool = make_pool(kind)
    merged = model_of(pave({"_target_": "pave_helpers.PoolRecordingMerger", "scaling_factor": 0.3}, rho=0.75).run(pool))
    seen = PoolRecordingMerger.seen
    assert issubclass(seen["type"], type(pool)) and seen["preprocessor"] is pool.load_processor()
    column = "image" if kind == "clip" else "text"
    assert seen["train"] == {t: pool.load_train_dataset(t)[column][:2] for t in pool.model_names}
    assert sorted(seen["models"]) == ["_pretrained_", "task0", "task1", "task2"]
    assert all(seen["instances"][name] is model for name, model in seen["models"].items())  # no stale instance
    original = pool.load_model("task0").state_dict()  # the user's pool still holds its own models
    purified = seen["models"]["task0"].state_dict()
    assert any(not torch.equal(purified[k], original[k]) for k in original)
    assert_state_dicts_equal(merged, TaskArithmeticAlgorithm(scaling_factor=0.3).run(
        BaseModelPool(dict(seen["models"]))))


@pytest.mark.parametrize("kind", ["clip", "mistral"])
def test_rho_one_reproduces_ties_bit_for_bit(kind):
    merged = model_of(pave(TIES).run(make_pool(kind)))
    oracle = TiesMergingAlgorithm(**{k: v for k, v in TIES.items() if k != "_target_"}).run(make_pool(kind))
    assert_state_dicts_equal(merged, oracle)


def test_rho_one_reproduces_emr():
    merged = model_of(pave({"_target_": "fusion_bench.method.emr_merging.EMRMerging"}).run(make_pool("clip")))
    oracle = EMRMerging().run(make_pool("clip"))
    assert_state_dicts_equal(merged, oracle)


@pytest.mark.parametrize("kind, linear_only", [("clip", False), ("clip", True), ("t5", True)])
def test_rho_one_dare_ties_matches_fusion_bench_dare_ties(kind, linear_only):
    """t5 ties lm_head to the shared embedding: its Linear-only drop hits the tied tensor once."""
    dare = {"sparsity_ratio": 0.4, "rescale": True, "only_on_linear_weights": linear_only}
    merged = model_of(pave({**TIES, "scaling_factor": 0.5}, dare=dare, seed=7).run(make_pool(kind)))
    pool = make_pool(kind)  # builds models with its own seeds, so seed afterwards
    torch.manual_seed(7)
    oracle = DareTiesMerging(
        sparsity_ratio=0.4, only_on_linear_weights=linear_only, rescale=True, scaling_factor=0.5,
        threshold=20, remove_keys=[], merge_func="sum",
    ).run(pool)
    # same random drops; only the rounding of (W_pre + delta) - W_pre differs
    for key, value in oracle.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=0, atol=1e-6)


# ------------------------------------------------------------ purification proper
def test_task_vector_target_at_rho_one_reproduces_task_arithmetic_bit_for_bit():
    merged = model_of(pave(TA, purify_target="task_vector").run(make_pool("clip")))
    assert_state_dicts_equal(merged, TaskArithmeticAlgorithm(scaling_factor=0.3).run(make_pool("clip")))


@pytest.mark.parametrize("target", ["finetuned", "task_vector"])
def test_purified_task_arithmetic_matches_independent_recomputation(target):
    pool = make_pool("mistral")
    algo = pave(TA, rho=0.8, purify_target=target)
    merged = algo.run(pool)["model"]
    extras = algo.extras
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(make_pool("mistral"))
    pretrained = make_pool("mistral").load_pretrained_model().state_dict()
    fresh = make_pool("mistral")
    purified_layers = {f"{layer}.weight" for layer in extras["full_ranks"]}
    assert "lm_head.weight" not in purified_layers  # classifier head excluded
    for key, value in merged.state_dict().items():
        if key not in purified_layers:
            assert torch.equal(value, oracle.state_dict()[key]), key  # plain delta elsewhere
    for layer, full in extras["full_ranks"].items():
        expected = pretrained[f"{layer}.weight"].clone()
        for task in fresh.model_names:
            model = fresh.load_model(task)
            stats = algo.task_covariance(fresh, task, model)
            cov_eps, _ = regularize_doubling(stats.covariance(layer), 0.01, 5e-2)
            weight = model.get_submodule(layer).weight.data
            w_pre = pretrained[f"{layer}.weight"]
            if target == "finetuned":
                tau_tilde = purify_weight(weight, cov_eps, extras["ranks"][task][layer]) - w_pre
            else:  # from the same context SVD of W_ft: U_r U_r^T tau where U spans R^out (out <= in), else
                # tau without its dropped directions
                u, tau = context_svd(weight, cov_eps)[0], (weight - w_pre).double()
                u_r, u_d = u[:, : extras["ranks"][task][layer]], u[:, extras["ranks"][task][layer] :]
                tau_tilde = (u_r @ (u_r.T @ tau) if weight.shape[0] <= weight.shape[1] else tau - u_d @ (u_d.T @ tau)).float()
            expected += 0.3 * tau_tilde
        torch.testing.assert_close(merged.state_dict()[f"{layer}.weight"], expected, rtol=1e-5, atol=1e-6)
    kept = [r for ranks in extras["ranks"].values() for r in ranks.values()]
    assert min(kept) < max(extras["full_ranks"].values())
    for layer, full in extras["full_ranks"].items():  # budget per layer
        assert sum(extras["ranks"][t][layer] for t in extras["ranks"]) <= int(0.8 * 3 * full)


def test_shared_inputs_share_one_covariance():
    pool = make_pool("t5")
    model = pool.load_model("task0")
    stats = pave().task_covariance(pool, "task0", model)
    block = "encoder.block.0.layer.0.SelfAttention"
    assert stats.input_of[f"{block}.k"] == stats.input_of[f"{block}.v"] == f"{block}.q"
    cross = [l for l in stats.layers if "EncDecAttention.k" in l or "EncDecAttention.v" in l]
    assert len(cross) == 4 and len({stats.input_of[l] for l in cross}) == 1  # encoder output, once


def test_padding_mask_makes_covariance_independent_of_batching():
    pool = make_pool("t5")
    model = pool.load_model("task0")
    batched = pave(batch_size=6).task_covariance(pool, "task0", model)
    single = pave(batch_size=1).task_covariance(pool, "task0", model)
    unmasked = pave(batch_size=6, mask_padding=False).task_covariance(pool, "task0", model)
    layer = "encoder.block.1.layer.1.DenseReluDense.wo"
    assert batched.count[batched.input_of[layer]] == single.count[single.input_of[layer]]
    assert unmasked.count[unmasked.input_of[layer]] > batched.count[batched.input_of[layer]]
    torch.testing.assert_close(batched.covariance(layer), single.covariance(layer), rtol=1e-5, atol=1e-7)


def test_bf16_pool():
    result = pave(TA, rho=0.8).run(make_pool("mistral", dtype=torch.bfloat16))
    weight = result["model"].model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16 and torch.isfinite(weight).all()
    assert result["pave"]["kept_ratio"]["task0"] < 1


def test_allocations_and_report_files(tmp_path):
    algo = pave(TA, rho=0.75, allocation="per_model")
    algo.fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(tmp_path)))
    summary = algo.run(make_pool("clip"))["pave"]
    extras = algo.extras
    assert "ranks" not in summary and summary["kept_ratio"] == extras["kept_ratio"]  # table only in the file
    log_dir = algo.log_dir
    assert os.path.getsize(os.path.join(log_dir, "pave_ranks.png")) > 1000
    with open(os.path.join(log_dir, "pave_report.json")) as f:
        assert json.load(f)["ranks"] == extras["ranks"]
    for task, ranks in extras["ranks"].items():  # per_model: one ratio per model, all layers 32 wide
        assert len(set(ranks.values())) == 1
    assert extras["covariance_time_s"] > 0 and extras["purification_time_s"] > 0
    uniform = pave(TA, rho=0.75, allocation="uniform")
    uniform.run(make_pool("clip"))
    assert {r for ranks in uniform.extras["ranks"].values() for r in ranks.values()} == {24}


# ------------------------------------------------------------------------ cache
def test_cache_hit_gives_identical_output_and_atomic_files(tmp_path, monkeypatch):
    first = pave(TIES, rho=0.8, cache_dir=str(tmp_path)).run(make_pool("clip"))["model"]
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3 and all(f.startswith("pave_cov_v3_") and f.endswith(".safetensors") for f in files)

    def no_collection(*args, **kwargs):
        raise AssertionError("covariance recollected despite a cache hit")

    monkeypatch.setattr(task_statistics, "collect_covariance", no_collection)
    algo = pave(TIES, rho=0.8, cache_dir=str(tmp_path))
    second = algo.run(make_pool("clip"))
    assert second["pave"]["covariance_cache_hits"] == 3
    assert algo.extras["covariance_cache_hits"] == ["task0", "task1", "task2"]
    assert_state_dicts_equal(first, second["model"])
    with pytest.raises(AssertionError, match="recollected"):  # a different key misses
        pave(TIES, rho=0.8, num_samples=8, cache_dir=str(tmp_path)).run(make_pool("clip"))
    monkeypatch.undo()

    def broken_save(handle, *args, **kwargs):
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pave_cache, "save_task_stats", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pave(TIES, num_samples=10, cache_dir=str(tmp_path)).run(make_pool("clip"))
    assert sorted(os.listdir(tmp_path)) == files  # nothing half-written


# ----------------------------------------------------------------------- errors
def test_rho_outside_unit_interval():
    for rho in [0.0, 1.5]:
        with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
            pave(rho=rho).run(make_pool("clip"))


def test_missing_calibration_data_names_the_task_before_any_collection(monkeypatch):
    pool = make_pool("clip")
    del pool._train_datasets["task1"]
    collected = []
    monkeypatch.setattr(task_statistics, "collect_covariance", lambda *a, **k: collected.append(1))
    with pytest.raises(ValueError, match=r"task 'task1' has no calibration data.*calibration_datasets"):
        pave().run(pool)
    assert collected == []  # task0's statistics were not collected first


def test_purify_tasks_purifies_only_them_as_a_pool_of_only_them_would(monkeypatch):
    """Official GLUE EMR purifies a subset: the listed tasks are purified exactly as in a pool holding
    only them (allocation among them), the others reach the merger as they were, with no statistics."""
    recording = {"_target_": "pave_helpers.PoolRecordingMerger", "scaling_factor": 0.3}
    calls = []
    collect = task_statistics.collect_covariance
    monkeypatch.setattr(task_statistics, "collect_covariance", lambda *a, **k: calls.append(1) or collect(*a, **k))
    algo = pave(recording, rho=0.6, purify_tasks=["task2", "task0"])
    algo.run(make_pool("clip"))
    subset = {name: model for name, model in PoolRecordingMerger.seen["models"].items()}
    assert len(calls) == 2 and algo.extras["purified_tasks"] == ["task0", "task2"]
    assert sorted(algo.extras["ranks"]) == ["task0", "task2"]
    only = make_pool("clip")
    for store in (only._models, only._train_datasets):
        del store["task1"]
    pave(recording, rho=0.6).run(only)
    alone = PoolRecordingMerger.seen["models"]
    for task in ("task0", "task2"):
        assert_state_dicts_equal(subset[task], alone[task])
    assert_state_dicts_equal(subset["task1"], make_pool("clip").load_model("task1"))
    with pytest.raises(ValueError, match=r"purify_tasks names task\(s\) \['task9'\]"):
        pave(purify_tasks=["task9"]).run(make_pool("clip"))
    with pytest.raises(ValueError, match="purify_tasks is empty"):
        pave(purify_tasks=[]).run(make_pool("clip"))


def test_calibration_split_reads_the_pools_split_and_flags_test_leakage(caplog):
    pool = make_pool("clip")
    pool._val_datasets = dict(pool._train_datasets)
    pool._test_datasets = dict(pool._train_datasets)
    on_train = pave().run(make_pool("clip"))
    for split in ("validation", "test"):
        algo = pave(calibration_split=split)
        assert_state_dicts_equal(model_of(algo.run(pool)), model_of(on_train))  # same data under another key
        assert algo.extras["calibration_split"] == split and algo.extras["test_leakage"] == (split == "test")
    assert "TEST-SET LEAKAGE" in caplog.text
    del pool._val_datasets["task2"]
    with pytest.raises(ValueError, match=r"task 'task2' has no calibration data: add `val_datasets.task2`"):
        pave(calibration_split="validation").run(pool)
    with pytest.raises(ValueError, match=r"calibration_split must be one of train, validation, test"):
        pave(calibration_split="dev").run(pool)


def test_fewer_samples_than_asked():
    with pytest.raises(ValueError, match=r"task 'task0': asked for 50 .* only 24 rows"):
        pave(num_samples=50).run(make_pool("clip"))


def test_shape_mismatch_and_non_finite_weights():
    pool = make_pool("clip")
    model = pool.load_model("task2")
    layer = model.vision_model.encoder.layers[0].mlp.fc1 if hasattr(model, "vision_model") else model.encoder.layers[0].mlp.fc1
    layer.weight = nn.Parameter(torch.zeros(16, 32))
    with pytest.raises(ValueError, match=r"task 'task2': parameter '.*fc1.weight' has shape \(16, 32\)"):
        pave().run(pool)
    pool = make_pool("clip")
    with torch.no_grad():
        next(pool.load_model("task1").parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="task 'task1': parameter .* non-finite"):
        pave().run(pool)


def test_num_rows_caps_every_input_and_errors_when_short():
    pool = make_pool("clip")  # 17 tokens per 32x32 image with 8x8 patches
    model = pool.load_model("task0")
    stats = pave(num_rows=100).task_covariance(pool, "task0", model)
    assert set(stats.count.values()) == {100}
    with pytest.raises(ValueError, match=r"task 'task0': Linear '.*' got only 204 token rows .* num_rows=300"):
        pave(num_rows=300).task_covariance(pool, "task0", model)


def test_calibration_data_must_be_a_hf_dataset():
    pool = make_pool("clip")
    pool._train_datasets["task0"] = [1, 2, 3]
    with pytest.raises(ValueError, match="task 'task0': calibration data must be a Hugging Face"):
        pave(num_samples=2).run(pool)


def test_non_finite_covariance_names_the_layer():
    pool = make_pool("clip")
    model = pool.load_model("task0")
    with torch.no_grad():
        model.get_submodule(next(n for n, m in model.named_modules() if n.endswith("layer_norm2"))).weight.fill_(1e30)
    with pytest.raises(ValueError, match="task 'task0': non-finite input covariance at Linear"):
        pave().task_covariance(pool, "task0", model)


def test_plain_model_when_the_program_saves_it():
    algo = pave(TA)
    algo._program = SimpleNamespace(merged_model_save_path="{log_dir}/merged")
    assert isinstance(algo.run(make_pool("clip")), nn.Module)
    assert isinstance(pave(TA, report_extras=False).run(make_pool("clip")), nn.Module)


def test_configured_calibration_dataset_replaces_the_train_split(tmp_path):
    pool = make_pool("clip")
    model = pool.load_model("task0")
    from_pool = pave().task_covariance(pool, "task0", model)
    pool._train_datasets["task0"].save_to_disk(str(tmp_path / "task0"))
    del pool._train_datasets["task0"]
    configured = pave(calibration_datasets={"task0": str(tmp_path / "task0")})
    from_disk = configured.task_covariance(pool, "task0", model)
    for key, value in from_pool.xtx.items():
        assert torch.equal(from_disk.xtx[key], value)
    # and a different dataset gives different statistics
    other = pave(calibration_datasets={"task0": str(tmp_path / "task0")}, seed=1).task_covariance(pool, "task0", model)
    assert not torch.equal(other.xtx[next(iter(other.xtx))], from_pool.xtx[next(iter(other.xtx))])


def test_kept_ratio_counts_the_purified_layers_only():
    """kept_ratio is rho's quantity: kept over full rank summed over the purified Linears; excluded
    ones (here every fc1, which keeps its fine-tuned weight) are in neither sum."""
    algo = pave(TA, rho=0.75, exclude_modules=["fc1"])
    pool = make_pool("clip")
    merged = algo.run(pool)["model"]
    ranks, full = algo.extras["ranks"], algo.extras["full_ranks"]
    assert len(full) == 10 and not any(layer.endswith("fc1") for layer in full)  # 12 Linears, 2 excluded
    for task, kept in ranks.items():
        assert kept.keys() == full.keys()
        assert algo.extras["kept_ratio"][task] == sum(kept.values()) / sum(full.values()) < 1
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(make_pool("clip"))
    for name, value in oracle.state_dict().items():
        if "fc1" in name:  # an excluded layer merges its plain task vectors
            assert torch.equal(merged.state_dict()[name], value), name
