"""Each task's input statistics for one PAVE run: read from the covariance cache, or collected
(sharded over DDP processes, all-reduced, checked) and then cached; or read from a statistics
directory written by method=pave_statistics, checked against the models first."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench_pave.io.fingerprint import fingerprint_state_dict
from fusion_bench_pave.attention_layers import attention_layer_names, attention_modules
from fusion_bench_pave.io.statistics import load_task_from_dir, read_statistics_index
from fusion_bench_pave.linear_layers import is_linear
from fusion_bench_pave.pave.cache import CovarianceCache, open_cache
from fusion_bench_pave.pave.calibration import (
    dataset_fingerprint,
    iter_batches,
    load_calibration_dataset,
    load_preprocessor,
    preprocessor_fingerprint,
    sample_indices,
    shard,
)
from fusion_bench_pave.pave.covariance import CovarianceStats, collect_covariance
from fusion_bench_pave.pave.heads import head_modules

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
HEADS = ["lm_head", "classifier", "score"]
#: Attribute of a model checked against a statistics directory: the fingerprint of the model its
#: statistics were collected on, so a nested merger reading the same directory accepts PAVE's
#: purified copy of it.
STATISTICS_OF = "pave_statistics_of"


@dataclass(frozen=True)
class CollectionSettings:
    """What decides a task's statistics, all of it in the cache key; the defaults are PAVE's (its
    constructor documents each; its exclude_modules=None means the heads)."""

    num_samples: int = 64
    num_rows: Optional[int] = None
    batch_size: int = 16
    max_length: int = 128
    mask_padding: bool = True
    accumulate_dtype: Literal["float32", "float64"] = "float64"
    seed: int = 42
    exclude: tuple[str, ...] = ()
    split: Literal["train", "validation", "test"] = "train"
    padding: Literal["longest", "max_length"] = "longest"
    attention: bool = False
    order: Literal["random", "first"] = "random"

    def includes(self, name: str, module: nn.Module) -> bool:
        """Whether the Linear `name` is purified: no exclude pattern matches it or its last name part."""
        return not any(fnmatch.fnmatch(name, p) or name.split(".")[-1] == p for p in self.exclude)


class CollectionKeys:
    """The settings of statistics collection from a class's constructor keys of the same names
    (PAVE's and pave_statistics'); exclude_modules=None means the model's task heads."""

    #: optional key: a class without it (PAVECausalLM: its decoders' attention is plain Linears) collects
    #: the inputs of Linears only
    purify_attention: bool = False

    def excluded_patterns(self, model: nn.Module) -> list[str]:
        """Patterns of the Linears of `model` without statistics: the configured ones, else its heads
        (HEADS and pave.heads.head_modules)."""
        if self.exclude_modules is not None:
            return list(self.exclude_modules)
        return HEADS + sorted(head_modules(model))

    def collection(self, model: nn.Module) -> CollectionSettings:
        """How statistics of models shaped like `model` are collected."""
        return CollectionSettings(
            num_samples=self.num_samples, num_rows=self.num_rows, batch_size=self.batch_size,
            max_length=self.max_length, mask_padding=self.mask_padding, accumulate_dtype=self.accumulate_dtype,
            seed=self.seed, exclude=tuple(self.excluded_patterns(model)), split=self.calibration_split,
            padding=self.calibration_padding, order=self.sample_order, attention=self.purify_attention)


def open_run_cache(cache_dir: Optional[str], fabric: Any) -> Optional[CovarianceCache]:
    """The covariance cache at cache_dir, checked once before any work (open_cache): None if unset
    or unusable. Under DDP rank 0 decides, since it alone writes the entries."""
    cache = open_cache(cache_dir) if cache_dir and fabric.is_global_zero else None
    if fabric.world_size > 1:
        usable = fabric.broadcast(None if cache is None else cache.writable, src=0)
        cache = None if usable is None or not cache_dir else CovarianceCache(cache_dir, usable)
    return cache


def check_statistics(task: str, stats: CovarianceStats, settings: CollectionSettings) -> None:
    """ValueError naming the task and Linear if an input got fewer than num_rows token rows or a
    non-finite sum."""
    short = {key: n for key, n in stats.count.items() if n < (settings.num_rows or 0)}
    if short:
        key, n = next(iter(short.items()))
        raise ValueError(
            f"task '{task}': Linear '{key}' got only {n} token rows from {settings.num_samples} samples, "
            f"fewer than num_rows={settings.num_rows}; raise num_samples or lower num_rows."
        )
    for key, xtx in stats.xtx.items():
        if not torch.isfinite(xtx).all():
            raise ValueError(
                f"task '{task}': non-finite input covariance at Linear '{key}'; check the "
                "fine-tuned weights and inputs (bf16 overflow? use float32 weights)."
            )


class TaskStatistics:
    """Statistics of the tasks of one pool, sharing its preprocessor and the run's cache; `hits`
    lists the tasks served from the cache."""

    def __init__(
        self,
        modelpool: Any,
        settings: CollectionSettings,
        fabric: Any,
        cache: Optional[CovarianceCache] = None,
        calibration_datasets: Optional[Mapping] = None,
    ):
        self.modelpool = modelpool
        self.settings = settings
        self.fabric = fabric
        self.cache = cache
        self.calibration_datasets = calibration_datasets
        self.hits: list[str] = []
        self._preprocessor: Any = None

    @property
    def preprocessor(self) -> Any:
        if self._preprocessor is None:
            self._preprocessor = load_preprocessor(self.modelpool)
        return self._preprocessor

    def dataset(self, task: str) -> Any:
        return load_calibration_dataset(self.modelpool, task, self.calibration_datasets, self.settings.split)

    def key_parts(self, task: str, model: nn.Module, dataset: Any) -> dict[str, Any]:
        """What this task's statistics are made from (the cache key parts); the preprocessor's
        fingerprint is None if it cannot be fingerprinted."""
        s = self.settings
        return {
            "model": fingerprint_state_dict(model.state_dict()),
            "dataset": dataset_fingerprint(dataset, task),
            "preprocessor": preprocessor_fingerprint(self.preprocessor),
            "num_samples": s.num_samples,
            "num_rows": s.num_rows,
            "seed": s.seed,
            "mask_padding": s.mask_padding,
            "max_length": s.max_length,
            "dtype": s.accumulate_dtype,
            "exclude": list(s.exclude),
            "split": s.split,
            "padding": s.padding,
            "order": s.order,
            # batches padded to their longest text count other padding rows at another batch size
            # (mask_padding false), and sum in another order in any case
            "batch_size": s.batch_size,
            **({"attention": True} if s.attention else {}),  # absent when off: earlier keys stay valid
        }

    def cache_parts(self, task: str, model: nn.Module, dataset: Any) -> Optional[dict[str, Any]]:
        """The cache key parts of this task's statistics, or None (and the cache off for the rest of
        the run) if the preprocessor cannot be fingerprinted."""
        parts = self.key_parts(task, model, dataset)
        if parts["preprocessor"] is None:
            log.warning(f"cannot fingerprint the preprocessor ({type(self.preprocessor).__name__}); "
                        "the covariance cache is not used in this run.")
            self.cache = None
            return None
        return parts

    def __call__(self, task: str, model: nn.Module, source: str = "") -> CovarianceStats:
        """Input statistics of every included Linear of `model` on the task's calibration samples,
        from the cache or collected (`collect`) and then cached. Statistics from the cache (also right
        after saving them there) are read lazily from it. `source` names a model other than the
        task's own (e.g. "pretrained") in the log and in `hits`."""
        dataset = self.dataset(task)
        parts = self.cache_parts(task, model, dataset) if self.cache is not None else None
        label = f"{task} ({source})" if source else task
        if parts is not None and (stats := self.cache.load(parts)) is not None:
            log.info(f"task '{label}': covariance statistics from the cache")
            self.hits.append(label)
            return stats
        stats = self.collect(task, model, dataset)
        if self.cache is None or not self.cache.writable:
            return stats
        if self.fabric.is_global_zero:
            self.cache.save(parts, stats)
        self.fabric.barrier()
        return self.cache.load(parts) or stats  # in memory if this process cannot see rank 0's cache

    def batches(self, task: str, model: nn.Module, dataset: Any) -> Iterable[tuple[dict, Optional[torch.Tensor]]]:
        """This process's calibration batches of `task` (with a progress bar): the seeded sample,
        and under DDP its share of whole batches, dealt round robin."""
        settings, fabric = self.settings, self.fabric
        indices = sample_indices(len(dataset), settings.num_samples, settings.seed, task, settings.order)
        if settings.num_rows is not None and fabric.world_size > 1:
            raise ValueError(
                "num_rows takes the first rows in calibration order, which one process cannot know "
                "under DDP; use num_samples (num_rows=null) with fabric.devices > 1."
            )
        if -(-len(indices) // settings.batch_size) < fabric.world_size:  # same verdict on every rank
            raise ValueError(
                f"task '{task}': {settings.num_samples} calibration samples make fewer batches than the "
                f"{fabric.world_size} processes; use num_samples >= {fabric.world_size * settings.batch_size}."
            )
        mine = shard(indices, fabric.global_rank, fabric.world_size, settings.batch_size)
        batches = iter_batches(dataset, mine, self.preprocessor, model, task, batch_size=settings.batch_size,
                               max_length=settings.max_length, mask_padding=settings.mask_padding,
                               padding=settings.padding)
        return tqdm(batches, total=-(-len(mine) // settings.batch_size), desc=f"PAVE covariance [{task}]",
                    disable=not fabric.is_global_zero)

    def collect(self, task: str, model: nn.Module, dataset: Any) -> CovarianceStats:
        """Collect the statistics on the CPU; with several processes each takes a shard of the
        calibration batches and the sums are all-reduced."""
        settings, fabric = self.settings, self.fabric
        stats = collect_covariance(model, self.batches(task, model, dataset), settings.includes,
                                   DTYPES[settings.accumulate_dtype], settings.num_rows, settings.attention)
        if fabric.world_size > 1:
            stats = stats.all_reduce(lambda t: fabric.all_reduce(t, reduce_op="sum"))
        check_statistics(task, stats, settings)  # after the all-reduce: the same verdict on every rank
        return stats.to("cpu")  # collected on the model's device; cached, offloaded and purified on the CPU


class StoredStatistics:
    """Each task's statistics from a statistics directory (io/statistics.py), restricted to the
    Linears that the `includes` given to `check` selects (all before). `check` refuses models they
    were not collected on, before any use."""

    def __init__(self, directory: str, tasks: list[str]):
        self.directory = directory
        self.includes: Callable[[str, Optional[nn.Module]], bool] = lambda name, module: True
        self.attention = True  # keep nn.MultiheadAttention's statistics (until `check` says otherwise)
        self.index = read_statistics_index(directory)
        self.hits: list[str] = []  # none come from the covariance cache
        if missing := [task for task in tasks if task not in self.index]:
            raise ValueError(
                f"statistics={directory} has no statistics of task(s) {missing} (it holds {sorted(self.index)}); "
                "write them for this pool with method=pave_statistics"
            )

    def check(self, models: Mapping[str, nn.Module], includes: Callable[[str, Optional[nn.Module]], bool],
              mark: bool = False, attention: bool = False) -> None:
        """ValueError naming the task and the mismatch if a model is not the one its statistics were
        collected on (or, marked with STATISTICS_OF, a copy of it), a Linear that `includes`
        selects was excluded from them, or `attention` asks for nn.MultiheadAttention's inputs they
        lack; later reads keep only those Linears. With `mark` (a caller's own copies), each model
        is then marked with STATISTICS_OF."""
        self.includes, self.attention = includes, attention
        for task, model in models.items():
            entry = self.index[task]
            fingerprint = getattr(model, STATISTICS_OF, None) or fingerprint_state_dict(model.state_dict())
            if fingerprint != entry["model"]:
                raise ValueError(
                    f"task '{task}': the statistics in {self.directory} were collected on another model "
                    f"(fingerprint {entry['model']}, this model's is {fingerprint}); recompute them for "
                    "this pool with method=pave_statistics"
                )
            if attention and not entry.get("attention", False) and attention_modules(model):
                raise ValueError(
                    f"task '{task}': purify_attention=true needs the inputs of nn.MultiheadAttention, which "
                    f"{self.directory} lacks; recompute the statistics with method.purify_attention=true"
                )
            recorded = CollectionSettings(exclude=tuple(entry["exclude"]))
            for name, module in model.named_modules():
                if is_linear(module) and self.includes(name, module) and not recorded.includes(name, module):
                    raise ValueError(
                        f"task '{task}': Linear '{name}' needs statistics but {self.directory} has none "
                        f"of it (collected with exclude_modules={entry['exclude']}); exclude it here too or "
                        "recompute the statistics with these exclude_modules"
                    )
            if mark:
                setattr(model, STATISTICS_OF, fingerprint)

    def __call__(self, task: str, model: nn.Module) -> CovarianceStats:
        stats = load_task_from_dir(self.directory, task, self.index[task])
        dropped = set() if self.attention else attention_layer_names(model)
        stats.input_of = {layer: key for layer, key in stats.input_of.items()
                          if self.includes(layer, None) and layer not in dropped}
        return stats
