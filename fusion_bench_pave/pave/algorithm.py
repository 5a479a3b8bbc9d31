"""PAVE as a FusionBench algorithm: purify every fine-tuned model of the pool, then run a nested
task-vector merger (TA, TIES, DARE+TIES, EMR, ...) unchanged on the purified models.

Purified models are W_pre + tau_tilde = W_tilde for hooked Linear weights and W_ft for everything
else, so the merger's own `W - W_pre` yields the purified task vectors.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
from copy import deepcopy
from typing import Any, Literal, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench_pave import plugin  # noqa: F401,I001  (compat repair before fusion_bench imports)
from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin
from fusion_bench.utils.instantiate_utils import instantiate
from fusion_bench_pave.arguments import reject_unknown_keys
from fusion_bench_pave.atomic import atomic_write_text
from fusion_bench_pave.pave.cache import CovarianceCache, fingerprint_state_dict, open_cache
from fusion_bench_pave.pave.calibration import (
    dataset_fingerprint,
    iter_batches,
    load_calibration_dataset,
    load_preprocessor,
    preprocessor_fingerprint,
    sample_indices,
    shard,
)
from fusion_bench_pave.pave.config_checks import check_calibration_tasks, check_hyperparameters
from fusion_bench_pave.pave.covariance import CovarianceStats, collect_covariance
from fusion_bench_pave.pave.heads import head_modules
from fusion_bench_pave.pave.offload import CovarianceOffload, Offload
from fusion_bench_pave.pave.plot import save_rank_heatmap
from fusion_bench_pave.pave.purify import context_eigh, remove_subspace
from fusion_bench_pave.pave.rank_allocation import Allocation, allocate_ranks, floor_rank, normalized_spectrum
from fusion_bench_pave.pave.regularize import Regularization, add_identity, regularize
from fusion_bench_pave.taskpool.compatibility import check_taskpool_fits

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
HEADS = ["lm_head", "classifier", "score"]
TAIL_BYTES = 2 * 2**30  # per_model: float64 columns of U kept between the spectra and purify passes


@auto_register_config
class PAVE(LightningFabricMixin, SimpleProfilerMixin, BaseAlgorithm):
    """Purify task vectors in the knowledge-aware subspace, then merge with `merger`."""

    def __init__(
        self,
        merger: DictConfig,
        rho: float = 1.0,
        allocation: Allocation = "per_layer",
        floor_factor: float = 1.5,
        num_samples: int = 64,
        num_rows: Optional[int] = None,
        batch_size: int = 16,
        max_length: int = 128,
        mask_padding: bool = True,
        regularization: Regularization = "doubling",
        eps0: float = 0.1,
        eps_tol: float = 5e-2,
        relative_alpha: float = 1e-3,
        accumulate_dtype: Literal["float32", "float64"] = "float64",
        exclude_modules: Optional[list[str]] = None,
        calibration_datasets: Optional[DictConfig] = None,
        dare: Optional[DictConfig] = None,
        seed: int = 42,
        cache_dir: Optional[str] = None,
        covariance_offload: Offload = "auto",
        report_extras: bool = True,
        **kwargs: Any,
    ):
        """
        Args:
            merger: config (with `_target_`) of the task-vector method run on the purified models.
            rho: global kept-rank ratio in (0, 1]; 1 reproduces the merger exactly.
            allocation: per_layer (greedy optimum), per_model (official collapse) or uniform.
            floor_factor: no model keeps fewer than R - round(factor * (R - round(rho * R))).
            num_samples: calibration samples drawn (seeded) from each task's train split.
            num_rows: optional N of the official code: each input's covariance uses its first
                num_rows (unmasked) token rows of those samples; single process only.
            batch_size, max_length: calibration batching and text truncation.
            mask_padding: exclude padding tokens from the covariance.
            regularization: "doubling" (official: eps0 doubled until ||C^-1 C - I||_F < eps_tol)
                or "relative" (eps = relative_alpha * mean diag C).
            accumulate_dtype: dtype of the X^T X sums.
            exclude_modules: glob patterns (or last name parts) of Linear modules kept unpurified;
                None means the classifier heads in HEADS, [] purifies every Linear.
            calibration_datasets: optional {task: dataset path or config} overriding the train
                splits; every task named must be a fine-tuned model of the pool.
            dare: optional {sparsity_ratio, rescale, only_on_linear_weights}: DARE drop+rescale of
                the raw deltas before purification (seeded with `seed`).
            seed: seed of calibration sampling and DARE.
            cache_dir: directory of the covariance cache (None disables it). One that cannot be
                created is skipped with a warning; a read-only one is read, not written.
            covariance_offload: where the statistics of all tasks wait for purification, which
                reads one layer's covariances at a time: "memory", "disk" (the cache files, else a
                temporary directory under TMPDIR removed at the end of the run) or "auto" (disk
                once T times the first task's statistics exceed 1 GiB). Results are identical.
            report_extras: return {"model": merged, "pave": summary} so a summary of the extras
                reaches the program's report (see `report_summary`). The full extras, with every
                (task, layer) rank, are in `self.extras` and in pave_report.json in the log dir.
                kept_ratio: each task's kept rank over its full rank, summed over the purified
                Linears (excluded ones are not counted, as in rho's budget).
            kwargs: only Hydra/FusionBench keys (``_target_``, ``_recursive_``, ...); any other key
                is a TypeError naming the closest valid key.
        """
        reject_unknown_keys(type(self), kwargs)
        super().__init__(**kwargs)
        self._cache: Optional[CovarianceCache] = None  # cache_dir as run found it (open_cache)
        self._cache_hits: list[str] = []  # tasks whose covariance came from the cache in this run
        self.extras: dict[str, Any] = {}  # of the last run: see report_summary
        self._preprocessor_object: Any = None
        self._heads: list[str] = []  # head_modules of the model check_purifiable saw (run: the pretrained)

    # ------------------------------------------------------------------ run
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module | dict:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(dict(modelpool))
        check_hyperparameters(self, DTYPES)
        check_calibration_tasks(self.calibration_datasets, list(modelpool.model_names))
        self._cache = self.open_cache()
        copy = deepcopy if modelpool.has_instance_models else (lambda m: m)
        pretrained = copy(modelpool.load_pretrained_model())
        check_taskpool_fits(self._program, modelpool, pretrained)
        self.check_purifiable(pretrained)
        finetuned = {name: copy(modelpool.load_model(name)) for name in modelpool.model_names}
        check_compatible(pretrained, finetuned)

        start = time.perf_counter()
        self._cache_hits, self._preprocessor_object = [], None
        with CovarianceOffload(self.covariance_offload, len(finetuned)) as offload:
            stats = {
                name: offload.keep(self.task_covariance(modelpool, name, model)) for name, model in finetuned.items()
            }
            covariance_time = time.perf_counter() - start

            if self.dare:
                dare_(pretrained, finetuned, self.dare, self.seed)
            start = time.perf_counter()
            ranks, full_ranks = self.purify_(finetuned, stats)
            purification_time = time.perf_counter() - start

        merged = self.merge(pretrained, finetuned)
        extras = {
            "rho": self.rho,
            "allocation": self.allocation,
            "covariance_time_s": covariance_time,
            "purification_time_s": purification_time,
            "covariance_cache_hits": self._cache_hits,
            "covariance_offload": "disk" if offload.on_disk else "memory",
            "kept_ratio": {
                t: sum(r.values()) / max(1, sum(full_ranks.values())) for t, r in ranks.items()
            },
            "full_ranks": full_ranks,
            "ranks": ranks,
        }
        self.extras = extras
        self.write_extras(extras)
        if not self.report_extras:
            return merged
        if getattr(self._program, "merged_model_save_path", None):
            log.info("merged model will be saved by the program: PAVE extras only in pave_report.json")
            return merged
        return {"model": merged, "pave": report_summary(extras)}

    # ---------------------------------------------------------- covariance
    @property
    def excluded_patterns(self) -> list[str]:
        """Patterns of Linear modules kept unpurified: the configured ones, else the heads (HEADS and
        the head_modules of the model check_purifiable saw)."""
        return list(HEADS + self._heads if self.exclude_modules is None else self.exclude_modules)

    def _include(self, name: str, module: nn.Linear) -> bool:
        return not any(fnmatch.fnmatch(name, p) or name.split(".")[-1] == p for p in self.excluded_patterns)

    def check_purifiable(self, model: nn.Module) -> None:
        """ValueError unless ``model`` has a Linear that exclude_modules leaves to purify: a run that
        purifies nothing would report the merger's result as PAVE's."""
        self._heads = sorted(head_modules(model))
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError(
                f"the model ({type(model).__name__}) has no nn.Linear module; PAVE purifies nn.Linear "
                "weights only, so it would purify nothing."
            )
        if not any(self._include(name, model.get_submodule(name)) for name in linears):
            raise ValueError(
                f"exclude_modules={self.excluded_patterns} excludes all {len(linears)} nn.Linear modules "
                f"of the model, so PAVE would purify nothing; narrow the patterns (null excludes only the "
                f"heads {HEADS}, [] purifies every Linear)."
            )

    def open_cache(self) -> Optional[CovarianceCache]:
        """The covariance cache at cache_dir, checked once before any work (open_cache): None if
        unset or unusable. Under DDP rank 0 decides, since it alone writes the entries."""
        cache = open_cache(self.cache_dir) if self.cache_dir and self.fabric.is_global_zero else None
        if self.fabric.world_size > 1:
            usable = self.fabric.broadcast(None if cache is None else cache.writable, src=0)
            cache = None if usable is None or not self.cache_dir else CovarianceCache(self.cache_dir, usable)
        return cache

    def task_covariance(self, modelpool: BaseModelPool, task: str, model: nn.Module) -> CovarianceStats:
        """Input statistics of every Linear of `model` on task's calibration samples; with several
        processes each takes a shard and the sums are all-reduced. Cached on disk if run found
        cache_dir usable; statistics from the cache (also right after saving them there) are read
        lazily from it."""
        dataset = load_calibration_dataset(modelpool, task, self.calibration_datasets)
        indices = sample_indices(len(dataset), self.num_samples, self.seed, task)
        cache, fingerprint = self._cache, None
        if cache is not None:
            fingerprint = preprocessor_fingerprint(self._preprocessor(modelpool))
            if fingerprint is None:
                log.warning(f"cannot fingerprint the preprocessor ({type(self._preprocessor(modelpool)).__name__}); "
                            "the covariance cache is not used in this run.")
                cache = self._cache = None
        parts = {
            "model": fingerprint_state_dict(model.state_dict()),
            "dataset": dataset_fingerprint(dataset, task),
            "preprocessor": fingerprint,
            "num_samples": self.num_samples,
            "num_rows": self.num_rows,
            "seed": self.seed,
            "mask_padding": self.mask_padding,
            "max_length": self.max_length,
            "dtype": self.accumulate_dtype,
            "exclude": self.excluded_patterns,
        }
        if cache is not None and (stats := cache.load(parts)) is not None:
            log.info(f"task '{task}': covariance statistics from the cache")
            self._cache_hits.append(task)
            return stats

        fabric = self.fabric
        if self.num_rows is not None and fabric.world_size > 1:
            raise ValueError(
                "num_rows takes the first rows in calibration order, which one process cannot know "
                "under DDP; use num_samples (num_rows=null) with fabric.devices > 1."
            )
        if -(-len(indices) // self.batch_size) < fabric.world_size:  # same verdict on every rank
            raise ValueError(
                f"task '{task}': {self.num_samples} calibration samples make fewer batches than the "
                f"{fabric.world_size} processes; use num_samples >= {fabric.world_size * self.batch_size}."
            )
        mine = shard(indices, fabric.global_rank, fabric.world_size, self.batch_size)
        batches = iter_batches(
            dataset,
            mine,
            self._preprocessor(modelpool),
            model,
            task,
            batch_size=self.batch_size,
            max_length=self.max_length,
            mask_padding=self.mask_padding,
        )
        batches = tqdm(
            batches,
            total=-(-len(mine) // self.batch_size),
            desc=f"PAVE covariance [{task}]",
            disable=not fabric.is_global_zero,
        )
        stats = collect_covariance(model, batches, self._include, DTYPES[self.accumulate_dtype], self.num_rows)
        short = {key: n for key, n in stats.count.items() if n < (self.num_rows or 0)}
        if short:
            key, n = next(iter(short.items()))
            raise ValueError(
                f"task '{task}': Linear '{key}' got only {n} token rows from {self.num_samples} samples, "
                f"fewer than num_rows={self.num_rows}; raise num_samples or lower num_rows."
            )
        if fabric.world_size > 1:
            stats = stats.all_reduce(lambda t: fabric.all_reduce(t, reduce_op="sum"))
        for key, xtx in stats.xtx.items():
            if not torch.isfinite(xtx).all():
                raise ValueError(
                    f"task '{task}': non-finite input covariance at Linear '{key}'; check the "
                    "fine-tuned weights and inputs (bf16 overflow? use float32 weights)."
                )
        if cache is not None and cache.writable:
            if fabric.is_global_zero:
                cache.save(parts, stats)
            fabric.barrier()
            return cache.load(parts) or stats  # in memory if this process cannot see rank 0's cache
        return stats

    def _preprocessor(self, modelpool: BaseModelPool) -> Any:
        if self._preprocessor_object is None:
            self._preprocessor_object = load_preprocessor(modelpool)
        return self._preprocessor_object

    # --------------------------------------------------------- purification
    @torch.no_grad()
    def purify_(
        self, finetuned: Mapping[str, nn.Module], stats: Mapping[str, CovarianceStats]
    ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """Replace every hooked Linear weight of every model by its purified version, in place.
        Returns the kept ranks {task: {layer: r}} and full ranks {layer: R}.

        Each (model, layer) takes one eigendecomposition of the Gram matrix of W C_eps (spectrum
        and U together). per_layer/uniform ranks depend on one layer's spectra only: decompose,
        allocate, project, layer by layer. per_model needs every layer's spectrum first, so the
        first pass also keeps the trailing columns of U that the collapsed ranks can drop (up to
        TAIL_BYTES; beyond that, pruned layers are decomposed again). Only eps is kept per input
        (C_eps is rebuilt, bit-identical), so one covariance at a time is regularised in memory."""
        tasks = list(finetuned)
        modules = [dict(m.named_modules()) for m in finetuned.values()]
        layers = [l for l in stats[tasks[0]].layers if all(l in stats[t].input_of for t in tasks)]
        if not layers:
            raise ValueError(
                f"none of the Linears that exclude_modules={self.excluded_patterns} leaves to purify ran "
                "a forward pass during calibration in every model, so PAVE would purify nothing."
            )
        eps: dict[tuple[str, str], float] = {}

        def cov_eps(task: str, layer: str) -> Tensor:
            key = (task, stats[task].input_of[layer])
            cov = stats[task].covariance(layer)
            if key in eps:
                return add_identity(cov, eps[key])
            regularized, eps[key] = regularize(cov, self.regularization, self.eps0, self.eps_tol, self.relative_alpha)
            return regularized

        def decompose(task_index: int, layer: str) -> tuple[Tensor, Tensor]:
            return context_eigh(modules[task_index][layer].weight, cov_eps(tasks[task_index], layer))

        def project(task_index: int, layer: str, tail: Tensor, start: int, rank: int) -> None:
            """Drop U's columns rank.. (tail holds columns start.. of U) from the layer's weight."""
            weight = modules[task_index][layer].weight
            weight.data = remove_subspace(weight.data, tail[:, rank - start :])

        show = self.fabric.is_global_zero
        allocated: dict[str, list[int]] = {}
        full_ranks: dict[str, int] = {}
        if self.allocation == "per_model":
            spectra, tails = {}, {}
            lowest = lowest_collapsed_fraction(layers, modules[0], len(tasks), self.rho, self.floor_factor)
            budget = TAIL_BYTES
            for layer in tqdm(layers, desc="PAVE spectra", disable=not show):
                spectra[layer] = []
                for i in range(len(tasks)):
                    u, s = decompose(i, layer)
                    spectra[layer].append(normalized_spectrum(s))
                    start = max(0, math.floor(lowest * len(s)) - 1)
                    tail = u[:, start:]
                    if tail.numel() * tail.element_size() <= budget:
                        budget -= tail.numel() * tail.element_size()
                        tails[(i, layer)] = (tail.clone(), start)
                full_ranks[layer] = len(spectra[layer][0])
            allocated = allocate_ranks(spectra, self.rho, self.allocation, self.floor_factor)
            for layer in tqdm(layers, desc="PAVE purify", disable=not show):
                for i in range(len(tasks)):
                    rank = allocated[layer][i]
                    if rank >= full_ranks[layer]:
                        continue
                    tail, start = tails.pop((i, layer), (None, 0))
                    if tail is None or rank < start:
                        tail, start = decompose(i, layer)[0], 0
                    project(i, layer, tail, start, rank)
        else:
            for layer in tqdm(layers, desc="PAVE purify", disable=not show):
                decompositions = [decompose(i, layer) for i in range(len(tasks))]
                spectra = {layer: [normalized_spectrum(s) for _, s in decompositions]}
                allocated[layer] = allocate_ranks(spectra, self.rho, self.allocation, self.floor_factor)[layer]
                full_ranks[layer] = len(decompositions[0][1])
                for i, (u, _) in enumerate(decompositions):
                    if allocated[layer][i] < full_ranks[layer]:
                        project(i, layer, u, 0, allocated[layer][i])
        ranks = {t: {layer: allocated[layer][i] for layer in layers} for i, t in enumerate(tasks)}
        return ranks, full_ranks

    # --------------------------------------------------------------- merge
    def merge(self, pretrained: nn.Module, purified: Mapping[str, nn.Module]) -> Any:
        """Run the nested merger on a pool of the pretrained and purified models."""
        config = self.merger if isinstance(self.merger, DictConfig) else OmegaConf.create(self.merger)
        merger = instantiate(config)
        if hasattr(merger, "_fabric_instance"):
            merger._fabric_instance = self.fabric
        merger._program = self._program
        pool = BaseModelPool({"_pretrained_": pretrained, **purified})
        return merger.run(pool)

    def write_extras(self, extras: dict) -> None:
        """pave_report.json and the rank heatmap PNG into the log directory (rank 0 only)."""
        log_dir = self.log_dir
        if log_dir is None or not self.fabric.is_global_zero:
            return
        atomic_write_text(os.path.join(log_dir, "pave_report.json"), json.dumps(extras, indent=2))
        if extras["full_ranks"]:
            save_rank_heatmap(extras["ranks"], extras["full_ranks"], os.path.join(log_dir, "pave_ranks.png"))


def report_summary(extras: Mapping[str, Any]) -> dict[str, Any]:
    """The part of PAVE's extras that goes into the program's report: settings, times, cache hits
    and each task's kept-rank ratio. The per-(task, layer) rank table would be hundreds of lines on
    a real model, so it stays in pave_report.json; cache hits are a count, since FusionBench's report
    printer fails on an empty list."""
    summary = {k: v for k, v in extras.items() if k not in ("full_ranks", "ranks", "covariance_cache_hits")}
    summary["covariance_cache_hits"] = len(extras["covariance_cache_hits"])
    return summary


def check_compatible(pretrained: nn.Module, finetuned: Mapping[str, nn.Module]) -> None:
    """Same parameter names and shapes as the pretrained model, and finite weights."""
    if not finetuned:
        raise ValueError("the pool has no fine-tuned models besides _pretrained_; PAVE needs at least one")
    for key, tensor in pretrained.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"pretrained model: parameter '{key}' has non-finite values (NaN/inf).")
    reference = {k: v.shape for k, v in pretrained.state_dict().items()}
    for task, model in finetuned.items():
        state = model.state_dict()
        if set(state) != set(reference):
            diff = sorted(set(state) ^ set(reference))[:5]
            raise ValueError(
                f"task '{task}': architecture differs from the pretrained model (parameters {diff} "
                "are not in both); all models of the pool must share one architecture."
            )
        for key, tensor in state.items():
            if tensor.shape != reference[key]:
                raise ValueError(
                    f"task '{task}': parameter '{key}' has shape {tuple(tensor.shape)}, pretrained has "
                    f"{tuple(reference[key])}; all models of the pool must share one architecture."
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"task '{task}': parameter '{key}' has non-finite values (NaN/inf).")


@torch.no_grad()
def dare_(pretrained: nn.Module, finetuned: Mapping[str, nn.Module], config: Mapping, seed: int) -> None:
    """DARE on raw deltas, in place: W_ft <- W_pre + drop(W_ft - W_pre), seeded; the random draws
    follow FusionBench's DareTiesMerging (models in pool order, parameters in module order)."""
    ratio = float(config["sparsity_ratio"])
    rescale = bool(config.get("rescale", True))
    linear_only = bool(config.get("only_on_linear_weights", False))
    if not 0 <= ratio < 1:
        raise ValueError(f"dare.sparsity_ratio must be in [0, 1), got {ratio}")
    reference = dict(pretrained.named_parameters())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for model in finetuned.values():
            if linear_only:
                params = [
                    (f"{n}.weight" if n else "weight", m.weight)
                    for n, m in model.named_modules()
                    if isinstance(m, nn.Linear)
                ]
            else:
                params = list(model.named_parameters())
            for name, param in params:
                delta = param.data - reference[name].data
                delta = delta * (torch.rand_like(delta) > ratio)
                if rescale:
                    delta = delta / (1 - ratio)
                param.data = reference[name].data + delta


def lowest_collapsed_fraction(
    layers: list[str], modules: Mapping[str, nn.Module], num_models: int, rho: float, floor_factor: float
) -> float:
    """Lower bound of per_model's collapsed kept ratio: every model keeps at least each layer's floor,
    so its ratio sum_l r_ml / sum_l R_l is at least min_l floor_l / R_l."""
    fractions = []
    for layer in layers:
        full = min(modules[layer].weight.shape)
        fractions.append(floor_rank(full, num_models, rho, floor_factor) / full)
    return min(fractions, default=1.0)
