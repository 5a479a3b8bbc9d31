"""Reject bad PAVE hyperparameters before any model is loaded or statistic collected, so a typo
fails in a second with the valid range instead of after minutes of covariance collection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, get_args

from fusion_bench.utils.packages import import_object

from fusion_bench_pave.arguments import check_argument_types
from fusion_bench_pave.pave.calibration import SAMPLE_ORDERS, SPLITS
from fusion_bench_pave.pave.offload import Offload
from fusion_bench_pave.pave.purification import PurifyTarget
from fusion_bench_pave.pave.rank_allocation import Allocation
from fusion_bench_pave.pave.regularize import Regularization
from fusion_bench_pave.pave.task_statistics import DTYPES


def check_merger(merger: Any) -> None:
    """The nested merger config names an importable class with a ``run`` method."""
    if not isinstance(merger, Mapping) and callable(getattr(merger, "run", None)):
        raise ValueError(
            f"merger must be a config with `_target_`, got an instantiated {type(merger).__name__}; "
            "instantiate PAVE with _recursive_=false (as fusion_bench does) so PAVE builds the merger itself"
        )
    target = merger.get("_target_") if isinstance(merger, Mapping) else None
    if not target:
        raise ValueError(f"merger needs a `_target_` (e.g. fusion_bench.method.TiesMergingAlgorithm), got {merger!r}")
    try:
        merger_class = import_object(str(target))
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"merger._target_={target!r} cannot be imported ({error}); use a FusionBench merging class "
            "such as fusion_bench.method.TiesMergingAlgorithm"
        ) from error
    if not callable(getattr(merger_class, "run", None)):
        raise ValueError(f"merger._target_={target!r} has no run(modelpool) method; it is not a merging algorithm")
    if not merges_finetuned_weights(merger_class):
        raise ValueError(
            f"merger._target_={target!r} does not merge the fine-tuned models into one model of their "
            "architecture: PAVE hands the merger purified fine-tuned models, whose differences from the "
            "pretrained model are the purified task vectors, so only such mergers use them (upscaling into "
            "SMILE, MoE or deeper models, ensembles, pruning or fine-tuning would not). Use one of "
            f"FusionBench's: {', '.join(sorted(name.rsplit('.', 1)[1] for name in FINETUNED_WEIGHT_MERGERS))}"
            "; or, for your own merger of fine-tuned weights, set its class attribute merges_task_vectors = True"
        )


FB = "fusion_bench.method."
#: FusionBench 0.2.33's methods that merge the task vectors W_ft - W_pre of a pool with no data, by
#: the qualified name of the defining class (``ISO_C_Merge`` and the like are aliases).
DATA_FREE_MERGERS = frozenset(FB + name for name in (
    "task_arithmetic.task_arithmetic.TaskArithmeticAlgorithm", "ties_merging.ties_merging.TiesMergingAlgorithm",
    "simple_average.SimpleAverageAlgorithm", "linear.simple_average_for_causallm.SimpleAverageForCausalLM",
    "dare.simple_average.DareSimpleAverage", "dare.task_arithmetic.DareTaskArithmetic",
    "dare.ties_merging.DareTiesMerging", "magmax.magmax.MagMaxAlgorithm", "model_stock.model_stock.ModelStock",
    "task_singular_vector.TSVM.TaskSingularVectorMerging", "isotropic_merging.iso.IsotropicMergingInCommonSubspace",
    "isotropic_merging.iso.IsotropicMergingInCommonAndTaskSubspace", "wudi.wudi.WUDIMerging",
    "tall_mask.task_arithmetic.TallMaskTaskArithmeticAlgorithm", "emr_merging.emr_merging.EMRMerging",
    "doge_ta.doge_ta.DOGE_TA_Algorithm", "singular_value_calibration.svc.SingularValueCalibration",
))
#: ... and those that merge them with statistics of the pool's datasets (train splits, or unlabeled
#: test splits for AdaMerging) read through its tokenizer or processor: the pool PAVE hands them is
#: the user's, so they collect their statistics on the purified models.
DATA_DEPENDENT_MERGERS = frozenset(FB + name for name in (
    "regmean.regmean.RegMeanAlgorithm", "regmean_plusplus.regmean_plusplus.RegMeanAlgorithmPlusPlus",
    "fisher_merging.fisher_merging.FisherMergingAlgorithm",
    "adamerging.task_wise_adamerging.TaskWiseAdaMergingAlgorithm",
    "adamerging.layer_wise_adamerging.LayerWiseAdaMergingAlgorithm",
    "adamerging.gpt2_layer_wise_adamerging.GPT2LayerWiseAdaMergingAlgorithm",
    "adamerging.flan_t5_layer_wise_adamerging.FlanT5LayerWiseAdaMergingAlgorithm",
    "adamerging.llama_adamerging.LayerWiseAdaMergingForLlamaSFT",
    "adamerging.resnet_adamerging._ResNetAdaMergingBase",
    "trust_region.clip_task_arithmetic.TaskArithmeticWithTrustRegionForCLIP",
    "ada_svd.clip_vision.AdaSVDMergingForCLIPVisionModel",
))
#: Every FusionBench method PAVE accepts as its merger; their subclasses qualify too. Others (SMILE,
#: depth upscaling, weight-ensembling MoE, Mixtral upscaling, ensembles, pruning, ...) build another
#: architecture or do not merge fine-tuned weights, so PAVE's purification would not act on a merge.
FINETUNED_WEIGHT_MERGERS = DATA_FREE_MERGERS | DATA_DEPENDENT_MERGERS


def merges_finetuned_weights(merger_class: type) -> bool:
    """A FusionBench class of FINETUNED_WEIGHT_MERGERS or a subclass of one, or a class that declares
    ``merges_task_vectors = True`` (a user's own method; we cannot tell from its code)."""
    if getattr(merger_class, "merges_task_vectors", False) is True:
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in FINETUNED_WEIGHT_MERGERS for c in getattr(merger_class, "__mro__", ()))


def check_hyperparameters(cls: type, arguments: Mapping[str, Any]) -> None:
    """Types, ranges and choices of PAVE's constructor ``arguments`` (``cls`` gives the types), and its merger."""
    check_purification(cls, arguments)
    check_choices(arguments, {"covariance_offload": get_args(Offload)})
    if arguments["eps_check_pretrained"] and arguments["regularization"] != "doubling":
        raise ValueError("eps_check_pretrained=true is a condition of the doubling rule's check; set "
                         f"regularization=doubling (got {arguments['regularization']!r}) or eps_check_pretrained=false")
    if arguments["eps_check_pretrained"] and arguments["statistics"] is not None:
        raise ValueError(
            "eps_check_pretrained=true needs the pretrained model's statistics on each task's calibration "
            f"inputs, which statistics={arguments['statistics']} does not hold; collect them in the run "
            "(statistics=null) or set eps_check_pretrained=false"
        )
    check_merger(arguments["merger"])


def check_purification(cls: type, arguments: Mapping[str, Any]) -> None:
    """Types of ``cls``'s constructor ``arguments``, the collection keys, and PAVE's purification keys
    (rho, eps, allocation, regularization, dare), shared by the in-memory and streamed PAVE."""
    check_collection(cls, arguments)
    if not 0 < arguments["rho"] <= 1:
        raise ValueError(f"rho must be in (0, 1], got {arguments['rho']}; rho=1 keeps every component.")
    for name in ("eps0", "eps_tol", "relative_alpha"):
        if not arguments[name] > 0:
            raise ValueError(f"{name} must be > 0, got {arguments[name]}")
    check_choices(arguments, {"allocation": get_args(Allocation), "regularization": get_args(Regularization),
                              "purify_target": get_args(PurifyTarget)})
    if arguments["dare"]:
        check_dare(arguments["dare"])


def check_collection(cls: type, arguments: Mapping[str, Any]) -> None:
    """Types of ``cls``'s constructor ``arguments`` and ranges of the statistics collection keys
    (PAVE's and pave_statistics')."""
    check_argument_types(cls, arguments)
    for name in ("num_samples", "batch_size", "max_length"):
        if arguments[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {arguments[name]}")
    if arguments["num_rows"] is not None and arguments["num_rows"] < 1:
        raise ValueError(f"num_rows must be >= 1 or null, got {arguments['num_rows']}")
    check_choices(arguments, {"accumulate_dtype": tuple(DTYPES), "calibration_split": tuple(SPLITS),
                              "calibration_padding": ("longest", "max_length"), "sample_order": SAMPLE_ORDERS})


def check_choices(arguments: Mapping[str, Any], choices: Mapping[str, tuple]) -> None:
    for name, allowed in choices.items():
        if arguments[name] not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {arguments[name]!r}")


DARE_KEYS = {"sparsity_ratio": "a number in [0, 1)", "rescale": "true or false", "only_on_linear_weights": "true or false"}


def check_dare(dare: Mapping) -> None:
    """``dare`` has a numeric sparsity_ratio in [0, 1) and no other keys than DARE_KEYS."""
    for key in dare:
        if key not in DARE_KEYS:
            raise TypeError(f"dare has no key '{key}' (valid keys: {', '.join(DARE_KEYS)})")
    ratio = dare.get("sparsity_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"dare.sparsity_ratio must be {DARE_KEYS['sparsity_ratio']}, got {ratio!r}")
    if not 0 <= ratio < 1:
        raise ValueError(f"dare.sparsity_ratio must be in [0, 1), got {ratio}")
    for key in ("rescale", "only_on_linear_weights"):
        if not isinstance(dare.get(key, False), bool):
            raise TypeError(f"dare.{key} must be {DARE_KEYS[key]}, got {dare[key]!r}")


def check_task_names(key: str, names: Iterable[str] | None, tasks: list[str]) -> None:
    """Every task named under ``key`` (calibration_datasets, purify_tasks) is a fine-tuned model of
    the pool: a misspelled task would otherwise be ignored silently."""
    unknown = [task for task in names or () if task not in tasks]
    if unknown:
        raise ValueError(f"{key} names task(s) {unknown} that the model pool does not have; its tasks are {tasks}")
    if names is not None and key == "purify_tasks" and not list(names):
        raise ValueError("purify_tasks is empty, so PAVE would purify nothing; list tasks or set it to null (all).")
