"""PAVE as a FusionBench algorithm: purify every fine-tuned model of the pool, then run a nested
task-vector merger (TA, TIES, DARE+TIES, EMR, ...) unchanged on the purified models.

Purified models are W_pre + tau_tilde = W_tilde for hooked Linear weights and W_ft for everything
else, so the merger's own `W - W_pre` yields the purified task vectors. The work is done by
task_statistics (statistics per task: collected, cached or from a statistics directory),
purification (pure math over {task: {layer: W}}) and models (checks, DARE); this class loads,
calls them, writes back and reports.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Literal, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from fusion_bench_pave import plugin  # noqa: F401,I001  (compat repair before fusion_bench imports)
from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin
from fusion_bench.utils.instantiate_utils import instantiate
from fusion_bench_pave.arguments import constructor_arguments, reject_unknown_keys
from fusion_bench_pave.linear_layers import type_summary
from fusion_bench_pave.pave.calibration import require_calibration_data
from fusion_bench_pave.pave.config_checks import check_hyperparameters, check_task_names
from fusion_bench_pave.pave.covariance import CovarianceStats
from fusion_bench_pave.pave.models import LinearWeights, check_compatible, check_purifiable, dare_, on_device, pool_with_models
from fusion_bench_pave.pave.offload import CovarianceOffload, Offload
from fusion_bench_pave.pave.purification import PurifySettings, PurifyTarget, purifiable_layers, purify
from fusion_bench_pave.pave.rank_allocation import Allocation
from fusion_bench_pave.pave.regularize import Regularization
from fusion_bench_pave.pave.report import report_summary, run_extras, write_extras
from fusion_bench_pave.pave.task_statistics import (
    CollectionKeys, CollectionSettings, StoredStatistics, TaskStatistics, open_run_cache,
)
from fusion_bench_pave.taskpool.compatibility import check_taskpool_fits

log = logging.getLogger(__name__)

PURIFY, COLLECT = PurifySettings(), CollectionSettings()  # the defaults


@auto_register_config
class PAVE(CollectionKeys, LightningFabricMixin, SimpleProfilerMixin, BaseAlgorithm):
    """Purify task vectors in the knowledge-aware subspace, then merge with `merger`."""

    def __init__(
        self,
        merger: DictConfig,
        rho: float = PURIFY.rho,
        allocation: Allocation = PURIFY.allocation,
        floor_factor: float = PURIFY.floor_factor,
        num_samples: int = COLLECT.num_samples,
        num_rows: Optional[int] = COLLECT.num_rows,
        batch_size: int = COLLECT.batch_size,
        max_length: int = COLLECT.max_length,
        mask_padding: bool = COLLECT.mask_padding,
        regularization: Regularization = PURIFY.regularization,
        eps0: float = PURIFY.eps0,
        eps_tol: float = PURIFY.eps_tol,
        eps_check_pretrained: bool = False,
        relative_alpha: float = PURIFY.relative_alpha,
        purify_target: PurifyTarget = PURIFY.purify_target,
        accumulate_dtype: Literal["float32", "float64"] = COLLECT.accumulate_dtype,
        exclude_modules: Optional[list[str]] = None,
        calibration_datasets: Optional[DictConfig] = None,
        calibration_split: Literal["train", "validation", "test"] = COLLECT.split,
        calibration_padding: Literal["longest", "max_length"] = COLLECT.padding,
        sample_order: Literal["random", "first"] = COLLECT.order,
        purify_tasks: Optional[list[str]] = None,
        purify_attention: bool = COLLECT.attention,
        dare: Optional[DictConfig] = None,
        seed: int = COLLECT.seed,
        cache_dir: Optional[str] = None,
        statistics: Optional[str] = None,
        covariance_offload: Offload = "auto",
        report_extras: bool = True,
        **kwargs: Any,
    ):
        """
        Args:
            merger: config (with `_target_`) of the merger of fine-tuned weights run on the purified models.
            rho: global kept-rank ratio in (0, 1]; 1 reproduces the merger exactly.
            allocation: per_layer (greedy optimum), per_model (official collapse) or uniform.
            floor_factor: no model keeps fewer than R - round(factor * (R - round(rho * R))).
            num_samples: calibration samples read from each task's calibration split (see sample_order).
            num_rows: optional N of the official code: each input's covariance uses its first
                num_rows (unmasked) token rows of those samples; single process only.
            batch_size, max_length: calibration batching and text truncation.
            mask_padding: exclude padding tokens from the covariance.
            regularization: "doubling" (official: eps0 doubled until ||C^-1 C - I||_F < eps_tol)
                or "relative" (eps = relative_alpha * mean diag C = relative_alpha * mean eigenvalue
                of C, so the regulariser scales with each input instead of swamping small ones).
            purify_target: "finetuned" (the paper: W_tilde = U_r U_r^T W_ft, tau_tilde = W_tilde - W_pre)
                or "task_vector" (a variant: tau_tilde = U_r U_r^T tau, the same U from W_ft C_eps, the
                pretrained weight untouched; a part of tau outside the span of U is kept).
            eps_check_pretrained: as the official ViT/GLUE code's second pass, the eps of the
                purification doubles until ||C^-1 C - I||_F of the fine-tuned C plus that of the
                PRETRAINED model's C on the same calibration inputs is below eps_tol; the rank
                allocation keeps the eps of the fine-tuned C alone (its first pass). Costs one
                pretrained forward pass per purified task (its statistics are cached like the
                fine-tuned ones); doubling only, not with `statistics`.
            accumulate_dtype: dtype of the X^T X sums.
            exclude_modules: glob patterns (or last name parts) of Linear modules kept unpurified;
                None means the task heads (pave/heads.py: Linears outside a Hugging Face model's
                body, the output embeddings, and any Linear named as in task_statistics.HEADS),
                [] purifies every Linear, ["*.self_attn.*"] only the MLP of a Hugging Face CLIP
                (fc1, fc2: the official ViT protocol). Excluded Linears keep their plain task vectors.
            calibration_datasets: optional {task: dataset path or config} overriding the pool's
                splits; every task named must be a fine-tuned model of the pool.
            calibration_split: the pool's datasets calibration reads: "train" (train_datasets),
                "validation" (val_datasets) or "test" (test_datasets: test-set leakage, as the
                official ViT code does; logged as a warning and flagged in the report).
            calibration_padding: "longest" (pad each batch to its longest text, the official GLUE
                path) or "max_length" (every text padded to max_length, the official LLM path).
            sample_order: "random" (a subset drawn with `seed`) or "first" (the first num_samples
                rows in dataset order, as the official ViT path reads its unshuffled test loader).
            purify_tasks: optional list of the tasks to purify (the official GLUE EMR purifies
                sst2, qqp and mnli); the others keep their plain task vectors, need no calibration
                data and take no part in the rank allocation. None purifies every task.
            purify_attention: also purify nn.MultiheadAttention (open_clip's ViTs): its packed q/k/v
                weight as three layers '<mha>.in_proj_q|k|v' from the MHA's input covariance, and
                its out_proj from the attention output's (attention_layers). False (the official
                ViT protocol: MLP only) leaves them plain task vectors, named in a warning and in
                the report's `unpurified`.
            dare: optional {sparsity_ratio, rescale, only_on_linear_weights}: DARE drop+rescale of
                the raw deltas before purification (seeded with `seed`).
            seed: seed of calibration sampling (sample_order=random) and DARE.
            cache_dir: directory of the covariance cache (None disables it). One that cannot be
                created is skipped with a warning; a read-only one is read, not written.
            statistics: optional directory written by method=pave_statistics: each task's statistics
                are read from it (no calibration data or preprocessor needed; the collection keys
                above and cache_dir are then unused). Statistics of another model, a task it lacks
                or a Linear to purify that it excluded are refused before any purification.
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
        self.extras: dict[str, Any] = {}  # of the last run: see report.run_extras

    @property
    def purification(self) -> PurifySettings:
        return PurifySettings(self.rho, self.allocation, self.floor_factor, self.regularization, self.eps0,
                              self.eps_tol, self.relative_alpha, self.purify_target)

    def task_covariance(self, modelpool: BaseModelPool, task: str, model: nn.Module) -> CovarianceStats:
        """Input statistics of one task, as a run collects them."""
        if self.statistics is not None:
            return StoredStatistics(self.statistics, [task])(task, model)
        cache = open_run_cache(self.cache_dir, self.fabric)
        return TaskStatistics(modelpool, self.collection(model), self.fabric, cache, self.calibration_datasets)(task, model)

    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module | dict:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(dict(modelpool))
        check_hyperparameters(type(self), constructor_arguments(self))
        tasks = list(modelpool.model_names)
        check_task_names("calibration_datasets", self.calibration_datasets, tasks)
        check_task_names("purify_tasks", self.purify_tasks, tasks)
        purified = [task for task in tasks if self.purify_tasks is None or task in self.purify_tasks]
        stored = StoredStatistics(self.statistics, purified) if self.statistics is not None else None
        cache = open_run_cache(self.cache_dir, self.fabric) if stored is None else None  # once, before any work
        fresh = copy.deepcopy if modelpool.has_instance_models else (lambda m: m)
        pretrained = fresh(modelpool.load_pretrained_model())
        check_taskpool_fits(self._program, modelpool, pretrained)
        collection = self.collection(pretrained)
        unpurified = check_purifiable(pretrained, collection.includes, list(collection.exclude), self.purify_attention)
        for task in purified if stored is None else ():
            require_calibration_data(modelpool, task, self.calibration_datasets, self.calibration_split)
        statistics = stored or TaskStatistics(modelpool, collection, self.fabric, cache, self.calibration_datasets)
        finetuned = {name: fresh(modelpool.load_model(name)) for name in modelpool.model_names}
        check_compatible(pretrained, finetuned)
        if stored is not None:  # marked, so that a nested merger reading them accepts the purified copies
            stored.check({name: finetuned[name] for name in purified}, collection.includes, mark=True,
                         attention=self.purify_attention)

        start = time.perf_counter()
        with CovarianceOffload(self.covariance_offload, len(purified) * (1 + self.eps_check_pretrained)) as offload:
            stats = {}
            for name in purified:
                with on_device(finetuned[name], self.fabric.device):
                    stats[name] = offload.keep(statistics(name, finetuned[name]))
            reference = {}
            for name in purified if self.eps_check_pretrained else ():
                with on_device(pretrained, self.fabric.device):
                    reference[name] = offload.keep(statistics(name, pretrained, source="pretrained"))
            times = {"covariance": time.perf_counter() - start}
            if self.dare:
                dare_(pretrained, finetuned, self.dare, self.seed)
            start = time.perf_counter()
            ranks, full_ranks = self.purify_({name: finetuned[name] for name in purified}, stats, pretrained,
                                             reference or None)
            times["purification"] = time.perf_counter() - start

        merged = self.merge(modelpool, pretrained, finetuned)
        settings = {"rho": self.rho, "allocation": self.allocation, "calibration_split": self.calibration_split,
                    "test_leakage": self.calibration_split == "test", "purified_tasks": purified,
                    "eps_check_pretrained": self.eps_check_pretrained,
                    "unpurified": type_summary(unpurified)}
        self.extras = run_extras(settings, times, statistics.hits, offload.on_disk, ranks, full_ranks)
        if self.log_dir is not None and self.fabric.is_global_zero:
            write_extras(self.log_dir, self.extras)
        if not self.report_extras:
            return merged
        if getattr(self._program, "merged_model_save_path", None):
            log.info("merged model will be saved by the program: PAVE extras only in pave_report.json")
            return merged
        return {"model": merged, "pave": report_summary(self.extras)}

    def purify_(
        self,
        finetuned: Mapping[str, nn.Module],
        stats: Mapping[str, CovarianceStats],
        pretrained: nn.Module,
        pretrained_statistics: Optional[Mapping[str, CovarianceStats]] = None,
    ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """Replace every purified Linear weight of every model by its purified version, in place, one
        layer at a time (`pretrained` is read with purify_target="task_vector"; `pretrained_statistics`:
        the pretrained model's statistics of each task, for eps_check_pretrained). Returns the kept ranks
        {task: {layer: r}} and full ranks {layer: R}."""
        if not purifiable_layers(stats):
            raise ValueError(
                f"none of the Linears that exclude_modules={self.exclude_modules} leaves to purify ran "
                "a forward pass during calibration in every model, so PAVE would purify nothing."
            )
        weights = {task: LinearWeights(model, self.purify_attention) for task, model in finetuned.items()}
        show = self.fabric.is_global_zero
        _, ranks, full_ranks = purify(
            weights, stats, self.purification,
            progress=lambda items, description: tqdm(items, desc=description, disable=not show),
            write=lambda task, layer, weight: weights[task].write(layer, weight),
            pretrained=LinearWeights(pretrained, self.purify_attention),
            pretrained_statistics=pretrained_statistics,
        )
        return ranks, full_ranks

    def merge(self, modelpool: BaseModelPool, pretrained: nn.Module, purified: Mapping[str, nn.Module]) -> Any:
        """Run the nested merger on the user's pool (datasets, tokenizer, processor, ...) with the
        pretrained and purified models in place of the configured ones."""
        config = self.merger if isinstance(self.merger, DictConfig) else OmegaConf.create(self.merger)
        merger = instantiate(config)
        if hasattr(merger, "_fabric_instance"):
            merger._fabric_instance = self.fabric
        if hasattr(merger, "_fabric"):  # FusionBench's v0.1-style classes (task-wise AdaMerging), as its program does
            merger._fabric = self.fabric
        merger._program = self._program
        return merger.run(pool_with_models(modelpool, {"_pretrained_": pretrained, **purified}))
