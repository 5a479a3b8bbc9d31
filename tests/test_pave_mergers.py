"""PAVE in front of FusionBench 0.2.33's mergers of fine-tuned weights (issue 19), each FusionBench
method its own oracle: PAVE at rho=1 returns the method's result bit for bit (PAVE hands it the
fine-tuned weights themselves and draws nothing from torch's global RNG, so seeding before both runs
gives random methods the same draws), and PAVE at rho<1 runs and changes it. Data-free methods run on
the in-memory CLIP pool, data-dependent ones on the tiny CLIP zoo (a real CLIPVisionModelPool with
train and test splits and zero-shot heads). Method settings are FusionBench's yaml defaults, with
fewer iterations and examples so the file stays fast."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_fusion_bench
from lightning import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from pave_helpers import make_pool
from torch import nn

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers)
from fusion_bench.tasks.clip_classification import CLIPTemplateFactory
from fusion_bench.utils.instantiate_utils import instantiate
from fusion_bench.utils.packages import import_object
from fusion_bench_pave.pave import PAVE, task_statistics
from fusion_bench_pave.pave.config_checks import FINETUNED_WEIGHT_MERGERS

TIES = {"scaling_factor": 0.5, "threshold": 20, "remove_keys": [], "merge_func": "sum"}
DARE = {"sparsity_ratio": 0.5, "only_on_linear_weights": False, "rescale": True}
DATA_FREE = {
    "TA": {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3},
    "TIES": {"_target_": "fusion_bench.method.TiesMergingAlgorithm", **TIES},
    "simple average": {"_target_": "fusion_bench.method.SimpleAverageAlgorithm"},
    "DARE-average": {"_target_": "fusion_bench.method.DareSimpleAverage", **DARE},
    "DARE-TA": {"_target_": "fusion_bench.method.DareTaskArithmetic", "scaling_factor": 0.3, **DARE},
    "DARE-TIES": {"_target_": "fusion_bench.method.dare.DareTiesMerging", **DARE, **TIES},
    "MagMax": {"_target_": "fusion_bench.method.MagMaxAlgorithm", "scaling_factor": 0.5},
    "Model Stock": {"_target_": "fusion_bench.method.model_stock.ModelStock"},
    "TSV-M": {"_target_": "fusion_bench.method.TaskSingularVectorMerging", "alpha": 1},
    "Iso-C": {"_target_": "fusion_bench.method.ISO_C_Merge", "scaling_factor": 1.0},
    "Iso-CTS": {"_target_": "fusion_bench.method.ISO_CTS_Merge", "scaling_factor": 1.0, "common_space_fraction": 0.8},
    "WUDI": {"_target_": "fusion_bench.method.WUDIMerging", "iter_num": 5},  # 400 in FusionBench's yaml
    "EMR": {"_target_": "fusion_bench.method.emr_merging.EMRMerging"},
    # zero_shot: the task vectors stand in for the gradients (with gradients FusionBench 0.2.33 stores
    # every task's under one key, so its trust region is empty and it returns the pretrained model)
    "trust region": {"_target_": "fusion_bench.method.trust_region.clip_task_arithmetic.TaskArithmeticWithTrustRegionForCLIP",
                     "scaling_factor": 0.3, "threshold_quantile": 0.99, "max_samples": 8, "batch_size": 8, "zero_shot": True},
    "SVC + TA": {"_target_": "fusion_bench.method.singular_value_calibration.task_arithmetic."
                 "SingularValueCalibrationArithmeticTask", "scaling_factor": 0.3, "alpha": 0.1},
    "SVC + TIES": {"_target_": "fusion_bench.method.singular_value_calibration.generic.SingularValueCalibrationWithBaseMethod",
                   "alpha": 0.1, "base_method": {"_target_": "fusion_bench.method.TiesMergingAlgorithm", **TIES}},
}
LOADER = {"batch_size": 8, "num_workers": 0}
ADAMERGING = {"name": "clip_layer_wise_adamerging", "weights": None, "optimizer": "adam", "lr": 1e-3, "init_values": 0.3,
              "clamp_weights": False, "tie_weights": True, "strict": False, "batch_size": 8, "num_workers": 0,
              "max_steps": 2, "fast_dev_run": False, "save_merging_weights": False}
DATA_DEPENDENT = {
    "RegMean": {"_target_": "fusion_bench.method.RegMeanAlgorithmForCLIP", "exclude_param_names_regex": [],
                "num_regmean_examples": 8, "weight_transpose": True, "reduce_non_diagonal_ratio": 0.95,
                "dataloader_kwargs": LOADER},
    "Fisher": {"_target_": "fusion_bench.method.FisherMergingForCLIPVisionModel", "exclude_param_names_regex": [],
               "normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6, "num_fisher_examples": 8,
               "dataloader_kwargs": LOADER},
    "AdaMerging (layer-wise)": {"_target_": "fusion_bench.method.CLIPLayerWiseAdaMergingAlgorithm",
                                "algorithm_config": ADAMERGING},
    "AdaMerging (task-wise)": {"_target_": "fusion_bench.method.CLIPTaskWiseAdaMergingAlgorithm",
                               "algorithm_config": {**ADAMERGING, "cache_dir": "."}},  # zero-shot heads in cwd
}
#: in FusionBench 0.2.33 these fail on their own, on any pool: run them to see when that changes
BROKEN_UPSTREAM = {
    # generate_task_masks compares state_dict(keep_vars=True) Parameters with task-vector Tensors
    "TALL masks": ({"_target_": "fusion_bench.method.tall_mask.TallMaskTaskArithmeticAlgorithm", "tall_mask_lambda": 0.6},
                   TypeError, "Tensor type mismatch"),
    # its class-level _config_mapping is a plain dict, which the constructor indexes with .inverse
    "RegMean++": ({**DATA_DEPENDENT["RegMean"], "_target_": "fusion_bench.method.RegMeanAlgorithmForCLIPPlusPlus"},
                  AttributeError, "'dict' object has no attribute 'inverse'"),
}


def fabric(tmp_path) -> Fabric:
    """Some mergers (AdaMerging) log their hyperparameters, so they need a logger."""
    return Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(tmp_path / "logs")))


def merged(result) -> nn.Module:
    return result["model"] if isinstance(result, dict) and "model" in result else result


def run_method(config: dict, pool, tmp_path) -> dict:
    torch.manual_seed(0)
    method = instantiate(OmegaConf.create(config))
    method._fabric_instance = fabric(tmp_path)
    if hasattr(method, "_fabric"):  # as FusionBench's program wires its v0.1-style classes
        method._fabric = method._fabric_instance
    return merged(method.run(pool)).state_dict()


def run_pave(config: dict, pool, tmp_path, rho: float) -> dict:
    torch.manual_seed(0)
    algorithm = PAVE(merger=config, rho=rho, num_samples=12, batch_size=4, eps0=0.01, cache_dir=str(tmp_path / "statistics"))
    algorithm.fabric = fabric(tmp_path)
    return merged(algorithm.run(pool)).state_dict()


def check_rho_one_and_below(config: dict, new_pool, tmp_path) -> None:
    """rho=1: the method's own state dict, bit for bit; rho=0.75: a different one."""
    own = run_method(config, new_pool(), tmp_path)
    at_one = run_pave(config, new_pool(), tmp_path, rho=1.0)
    assert own.keys() == at_one.keys()
    for key, value in own.items():
        assert torch.equal(at_one[key], value), key
    purified = run_pave(config, new_pool(), tmp_path, rho=0.75)
    changed = [key for key, value in own.items() if not torch.equal(purified[key], value)]
    assert any(key.endswith(("fc1.weight", "wi.weight", "up_proj.weight")) for key in changed), changed


@pytest.fixture(scope="module")
def statistics_dir(tmp_path_factory):
    """One covariance cache for the module: each pool's statistics are collected once."""
    return tmp_path_factory.mktemp("mergers")


@pytest.mark.parametrize("name", list(DATA_FREE))
def test_data_free_merger_after_pave(name, statistics_dir):
    check_rho_one_and_below(DATA_FREE[name], lambda: make_pool("clip", tasks=2), statistics_dir)


@pytest.mark.parametrize("kind, name", [("mistral", "TSV-M"), ("mistral", "Iso-CTS"), ("t5", "Iso-C")])
def test_svd_mergers_after_pave_on_language_models(kind, name, statistics_dir):
    """Methods that decompose every 2-D parameter (embeddings and tied heads included) on the T5 and
    Mistral pools; the other data-free methods treat every parameter alike (TA, TIES, DARE, ...: T5 and
    Mistral in test_pave_algorithm)."""
    check_rho_one_and_below(DATA_FREE[name], lambda: make_pool(kind, tasks=2), statistics_dir)


@pytest.fixture
def clip_zoo_pool(tiny_zoo, monkeypatch, tmp_path):
    """Builds the tiny CLIP zoo's model pool as the CLI does; its task names get their zero-shot class
    names and templates as the tiny_clip task pool registers them; cwd is tmp_path, where FusionBench
    caches the zero-shot heads (outputs/cache)."""
    tiny_zoo("clip")
    config = compose_fusion_bench(["modelpool=tiny_clip", "taskpool=tiny_clip"])
    for task, info in config.taskpool.dataset_templates.items():
        monkeypatch.setitem(CLIPTemplateFactory._dataset_mapping, task, dict(info))
    monkeypatch.chdir(tmp_path)
    return lambda: instantiate(config.modelpool)


@pytest.mark.parametrize("name", list(DATA_DEPENDENT))
def test_data_dependent_merger_after_pave(name, clip_zoo_pool, statistics_dir):
    check_rho_one_and_below(DATA_DEPENDENT[name], clip_zoo_pool, statistics_dir)


@pytest.mark.parametrize("name", list(BROKEN_UPSTREAM))
def test_methods_broken_in_fusion_bench_fail_on_their_own(name, clip_zoo_pool, tmp_path):
    """Not a PAVE limit: these fail without PAVE. When FusionBench fixes them, this fails: move them
    into the matrix above."""
    config, error, message = BROKEN_UPSTREAM[name]
    with pytest.raises(error, match=message):
        run_method(config, clip_zoo_pool(), tmp_path)


def test_trust_region_with_gradients_returns_the_pretrained_model_on_its_own(clip_zoo_pool, tmp_path):
    """Why the matrix runs the trust region with zero_shot=true only: with gradients, FusionBench 0.2.33
    files every task's under one key, its trust region is empty and it returns the pretrained model
    whatever the fine-tuned ones (so PAVE could not change it). When this fails, add it to the matrix."""
    config = {**DATA_FREE["trust region"], "zero_shot": False}
    own = run_method(config, clip_zoo_pool(), tmp_path)
    pretrained = clip_zoo_pool().load_pretrained_model().state_dict()
    assert all(torch.equal(own[key], value) for key, value in pretrained.items())


# --------------------------------------------------------------- which mergers PAVE accepts
REFUSED = {
    "SMILE": {"_target_": "fusion_bench.method.SmileUpscalingAlgorithm"},
    "depth upscaling": {"_target_": "fusion_bench.method.DepthUpscalingAlgorithm", "layer_indices": [0, 1, 1]},
    "weight-ensembling MoE": {"_target_": "fusion_bench.method.CLIPWeightEnsemblingMoEAlgorithm"},
    "rank-one MoE": {"_target_": "fusion_bench.method.CLIPRankOneMoEAlgorithm"},
    "pruning": {"_target_": "fusion_bench.method.MagnitudeDiffPruningAlgorithm"},
    "ensemble": {"_target_": "fusion_bench.method.SimpleEnsembleAlgorithm"},
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_method_that_does_not_merge_finetuned_weights_is_refused_before_any_statistics(name, monkeypatch):
    def no_collection(*args, **kwargs):
        raise AssertionError("statistics collected before the merger was checked")

    monkeypatch.setattr(task_statistics, "collect_covariance", no_collection)
    target = REFUSED[name]["_target_"]
    with pytest.raises(ValueError, match=rf"merger\._target_='{target}' does not merge the fine-tuned models into one "
                                         r"model of their architecture.*RegMeanAlgorithm.*merges_task_vectors = True"):
        PAVE(merger=REFUSED[name], rho=0.75).run(make_pool("clip"))


def test_every_accepted_merger_names_a_fusion_bench_class():
    """The allow-list holds qualified names of defining classes (aliases such as ISO_C_Merge would never
    match a class's own name). All of them import, ResNet AdaMerging on Python 3.11 too, through the
    plugin's ``typing.override`` shim."""
    for name in FINETUNED_WEIGHT_MERGERS:
        cls = import_object(name)
        assert f"{cls.__module__}.{cls.__qualname__}" == name
