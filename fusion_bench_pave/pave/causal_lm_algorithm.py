"""Streamed PAVE for causal LMs as a FusionBench algorithm: reads the checkpoints of a CausalLMPool
(never a whole model), purifies and merges them with ``causal_lm_purification`` into a sharded
safetensors directory, and returns the merged model loaded from it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from fusion_bench_pave import plugin  # noqa: F401,I001  (compat repair before fusion_bench imports)
from fusion_bench import BaseAlgorithm, auto_register_config
from fusion_bench.mixins import LightningFabricMixin
from fusion_bench.modelpool import CausalLMPool
from fusion_bench.utils.dtype import parse_dtype
from fusion_bench_pave.arguments import constructor_arguments, reject_unknown_keys
from fusion_bench_pave.causal_lm_skeleton import meta_causal_lm
from fusion_bench_pave.io.atomic import refuse_replacing_dir
from fusion_bench_pave.io.shared_output import shared_temporary_dir
from fusion_bench_pave.merging.fusion_bench_methods import streamed_merger
from fusion_bench_pave.merging.stream import Dare
from fusion_bench_pave.modelpool.checkpoints import safetensors_checkpoint_dir
from fusion_bench_pave.pave.calibration import require_calibration_data
from fusion_bench_pave.pave.causal_lm_purification import (
    StreamedCollection,
    check_streamed_allocation,
    pave_merge_causal_lm_checkpoints,
)
from fusion_bench_pave.pave.config_checks import check_merger, check_purification, check_task_names
from fusion_bench_pave.pave.models import check_purifiable
from fusion_bench_pave.pave.purification import PurifySettings, PurifyTarget
from fusion_bench_pave.pave.rank_allocation import Allocation
from fusion_bench_pave.pave.regularize import Regularization
from fusion_bench_pave.pave.task_statistics import DTYPES, CollectionKeys, TaskStatistics, check_statistics
from fusion_bench_pave.taskpool.compatibility import LANGUAGE_MODEL, check_taskpool_fits

log = logging.getLogger(__name__)

#: model types whose decoder layers the layer-by-layer statistics run (causal_lm_statistics)
ARCHITECTURES = ("mistral", "llama", "qwen2")


@auto_register_config
class PAVECausalLM(CollectionKeys, LightningFabricMixin, BaseAlgorithm):
    """PAVE + a streamed merger (TA, TIES, DARE-TA, DARE-TIES) of Mistral / Llama / Qwen2 checkpoints,
    one decoder layer at a time. The defaults are the official LLM protocol (Llama-2-7B math+code).
    Under Fabric DDP (``num_rows: null``, ``num_samples`` of at least one batch per rank) the ranks share
    the calibration batches, the purification and the merge (``causal_lm_purification``)."""

    unsupported_keys = {
        "eps_check_pretrained": "the official LLM path checks eps on each fine-tuned model's covariance alone "
        "(NLG/model_merging_methods/task_vector.py), and the streamed statistics are collected for the "
        "fine-tuned checkpoints only; use method=pave (in memory) for the ViT/GLUE second-pass check",
    }

    def __init__(
        self,
        merger: DictConfig,
        rho: float = 4089 / 4096,
        allocation: Allocation = "uniform",
        floor_factor: float = 1.5,
        num_samples: int = 1,
        num_rows: Optional[int] = 512,
        batch_size: int = 1,
        max_length: int = 512,
        mask_padding: bool = False,
        regularization: Regularization = "doubling",
        eps0: float = 0.01,
        eps_tol: float = 1e-2,
        relative_alpha: float = 1e-3,
        purify_target: PurifyTarget = "finetuned",
        accumulate_dtype: Literal["float32", "float64"] = "float64",
        exclude_modules: Optional[list[str]] = None,
        calibration_datasets: Optional[DictConfig] = None,
        calibration_split: Literal["train", "validation", "test"] = "train",
        calibration_padding: Literal["longest", "max_length"] = "max_length",
        sample_order: Literal["random", "first"] = "random",
        purify_tasks: Optional[list[str]] = None,
        dare: Optional[DictConfig] = None,
        seed: int = 42,
        model_dtype: Optional[str] = None,
        device: str = "cpu",
        output_path: Optional[str] = None,
        overwrite: bool = False,
        scratch_dir: Optional[str] = None,
        max_shard_gb: float = 2.0,
        **kwargs: Any,
    ):
        """
        Args:
            merger: FusionBench merger config: TaskArithmeticAlgorithm, TiesMergingAlgorithm (remove_keys
                []), dare.DareTaskArithmetic or dare.DareTiesMerging (its drop seeded with `seed`).
            rho ... dare, seed: as PAVE's keys (config/method/pave.yaml), with the official LLM defaults:
                rho 4089/4096, uniform allocation, eps0 0.01, eps_tol 1e-2, the first 512 token rows of one
                text padded to 512 (padding counted). allocation: uniform or per_layer only.
            model_dtype: dtype the weights are used in for the statistics (None: as stored).
            device: where the statistics are collected (the purification and merge run on the CPU);
                under multi-GPU DDP, cuda is each rank's own GPU.
            output_path: directory of the merged checkpoint (refused if it exists, unless `overwrite`);
                None: a temporary directory, removed once the model is loaded from it. Under DDP it, and
                `scratch_dir`, must be on a filesystem every rank sees.
            scratch_dir: where the purified weights wait for the merge (a temporary directory in it,
                removed at the end; as large as the purified Linear weights of all tasks). None: TMPDIR.
            max_shard_gb: shard size of the output and scratch checkpoints (the writer buffers one shard).
        """
        reject_unknown_keys(type(self), kwargs)
        super().__init__(**kwargs)
        self.extras: dict[str, Any] = {}  # of the last run: ranks, full ranks and kept ratios

    @property
    def purification(self) -> PurifySettings:
        return PurifySettings(self.rho, self.allocation, self.floor_factor, self.regularization, self.eps0,
                              self.eps_tol, self.relative_alpha, self.purify_target)

    @property
    def statistics_device(self) -> torch.device:
        """``device``; under multi-GPU DDP a CUDA device means each rank's own GPU."""
        device = torch.device(self.device)
        if self.fabric.world_size > 1 and device.type == self.fabric.device.type == "cuda":
            return self.fabric.device
        return device

    def checkpoints(self, modelpool: Any) -> dict[str, Path]:
        """Each pool entry's safetensors directory; ValueError naming the entry otherwise."""
        if not isinstance(modelpool, CausalLMPool):
            raise ValueError(f"PAVECausalLM streams the checkpoints of a CausalLMPool; got {type(modelpool).__name__} "
                             "(use method=pave_ta with the in-memory PAVE for other pools)")
        dirs = {}
        for name in modelpool.all_model_names:
            dirs[name] = safetensors_checkpoint_dir(modelpool, name)
            if dirs[name] is None:
                raise ValueError(f"model '{name}' ({modelpool.get_model_path(name)}): no safetensors checkpoint "
                                 "there (a directory with config.json and *.safetensors, or a cached hub id)")
        return dirs

    def run(self, modelpool: CausalLMPool) -> PreTrainedModel:
        check_purification(type(self), constructor_arguments(self))
        check_streamed_allocation(self.purification)
        check_merger(self.merger)
        method, merge_dare = streamed_merger(self.merger, self.seed)
        if self.output_path is not None:
            refuse_replacing_dir(self.output_path, self.overwrite)
        dirs = self.checkpoints(modelpool)
        tasks = list(modelpool.model_names)
        check_task_names("calibration_datasets", self.calibration_datasets, tasks)
        check_task_names("purify_tasks", self.purify_tasks, tasks)
        config = AutoConfig.from_pretrained(dirs["_pretrained_"])
        if config.model_type not in ARCHITECTURES:
            raise ValueError(f"model '_pretrained_' ({dirs['_pretrained_']}) is a {config.model_type!r} model; the "
                             f"streamed PAVE runs {', '.join(ARCHITECTURES)} decoders (use the in-memory PAVE)")
        check_taskpool_fits(self._program, modelpool, LANGUAGE_MODEL)
        skeleton = meta_causal_lm(config)
        collection = self.collection(skeleton)
        check_purifiable(skeleton, collection.includes, list(collection.exclude))
        purified = [task for task in tasks if self.purify_tasks is None or task in self.purify_tasks]
        for task in purified:
            require_calibration_data(modelpool, task, self.calibration_datasets, self.calibration_split)
        statistics = TaskStatistics(modelpool, collection, self.fabric, None, self.calibration_datasets)
        batches = {task: statistics.batches(task, skeleton, statistics.dataset(task)) for task in purified}
        dare = Dare(self.dare["sparsity_ratio"], self.dare.get("rescale", True), self.dare.get("only_on_linear_weights", False),
                    self.seed) if self.dare else None
        with shared_temporary_dir(self.fabric, prefix="pave-merged-", dir=self.scratch_dir) as scratch:
            out = self.output_path or Path(scratch) / "merged"
            result = pave_merge_causal_lm_checkpoints(
                dirs["_pretrained_"], {task: dirs[task] for task in tasks}, out, method, batches, self.purification,
                collection=StreamedCollection(collection.includes, DTYPES[self.accumulate_dtype], self.num_rows,
                                              parse_dtype(self.model_dtype), self.statistics_device),
                check=lambda task, stats: check_statistics(task, stats, collection), dare=dare, merge_dare=merge_dare,
                scratch_dir=self.scratch_dir, max_shard_bytes=int(self.max_shard_gb * 2**30), overwrite=self.overwrite,
                progress=self.fabric.is_global_zero, fabric=self.fabric)
            merged = AutoModelForCausalLM.from_pretrained(out).eval()
        total = sum(result.full_ranks.values())
        self.extras = {"ranks": result.ranks, "full_ranks": result.full_ranks,
                       "kept_ratio": {task: sum(ranks.values()) / max(1, total) for task, ranks in result.ranks.items()}}
        log.info("PAVE kept-rank ratios: %s", self.extras["kept_ratio"])
        return merged
