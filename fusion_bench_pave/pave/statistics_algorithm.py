"""``method=pave_statistics``: measure each task's per-Linear input statistics once and write them to a
statistics directory (io/statistics.py) that PAVE (``statistics: <dir>``) and RegMean read without the
calibration data. The collection is PAVE's own (task_statistics), with the same keys and defaults."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Literal, Optional

from omegaconf import DictConfig

from fusion_bench_pave import plugin  # noqa: F401,I001  (compat repair before fusion_bench imports)
from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin
from fusion_bench_pave.arguments import constructor_arguments, reject_unknown_keys
from fusion_bench_pave.io.atomic import refuse_replacing_dir
from fusion_bench_pave.io.statistics import statistics_dir_writer
from fusion_bench_pave.pave.calibration import require_calibration_data
from fusion_bench_pave.pave.config_checks import check_collection, check_task_names
from fusion_bench_pave.pave.models import on_device
from fusion_bench_pave.pave.task_statistics import CollectionKeys, CollectionSettings, TaskStatistics

log = logging.getLogger(__name__)

COLLECT = CollectionSettings()  # PAVE's defaults


@auto_register_config
class PAVEStatistics(CollectionKeys, LightningFabricMixin, BaseAlgorithm):
    """Write the input statistics of every fine-tuned model of the pool to `output_dir`; returns None
    (there is no merged model to evaluate or save)."""

    def __init__(
        self,
        output_dir: str,
        overwrite: bool = False,
        num_samples: int = COLLECT.num_samples,
        num_rows: Optional[int] = COLLECT.num_rows,
        batch_size: int = COLLECT.batch_size,
        max_length: int = COLLECT.max_length,
        mask_padding: bool = COLLECT.mask_padding,
        accumulate_dtype: Literal["float32", "float64"] = COLLECT.accumulate_dtype,
        exclude_modules: Optional[list[str]] = None,
        calibration_datasets: Optional[DictConfig] = None,
        calibration_split: Literal["train", "validation", "test"] = COLLECT.split,
        calibration_padding: Literal["longest", "max_length"] = COLLECT.padding,
        purify_attention: bool = COLLECT.attention,
        sample_order: Literal["random", "first"] = COLLECT.order,
        seed: int = COLLECT.seed,
        **kwargs: Any,
    ):
        """
        Args:
            output_dir: the statistics directory to write (atomically: complete or absent).
            overwrite: replace an existing output_dir (only if it holds nothing but what we wrote).
            num_samples, num_rows, batch_size, max_length, mask_padding, accumulate_dtype,
            exclude_modules, calibration_datasets, calibration_split, calibration_padding, sample_order,
            purify_attention (collect nn.MultiheadAttention's inputs too), seed: as
                PAVE's keys of the same names; a PAVE run
                with the same values collects the same statistics, bit for bit.
            kwargs: only Hydra/FusionBench keys (``_target_``, ...); any other key is a TypeError.
        """
        reject_unknown_keys(type(self), kwargs)
        super().__init__(**kwargs)

    def run(self, modelpool: BaseModelPool) -> None:
        check_collection(type(self), constructor_arguments(self))
        tasks = list(modelpool.model_names)
        check_task_names("calibration_datasets", self.calibration_datasets, tasks)
        for task in tasks:
            require_calibration_data(modelpool, task, self.calibration_datasets, self.calibration_split)
        refuse_replacing_dir(self.output_dir, self.overwrite)  # on every process, before any work
        source = None
        writing = self.fabric.is_global_zero
        with statistics_dir_writer(self.output_dir, self.overwrite) if writing else nullcontext() as add:
            for task in tasks:
                model = modelpool.load_model(task)
                if source is None:  # the default exclusion (the task heads) is read off the pool's models
                    source = TaskStatistics(modelpool, self.collection(model), self.fabric, None, self.calibration_datasets)
                dataset = source.dataset(task)
                with on_device(model, self.fabric.device):
                    stats = source.collect(task, model, dataset)
                if writing:
                    parts = source.key_parts(task, model, dataset)
                    if parts["preprocessor"] is None:
                        log.warning(f"task '{task}': the preprocessor cannot be fingerprinted; recorded as null")
                    add(task, parts, stats)
        self.fabric.barrier()
        log.info(f"statistics of {len(tasks)} task(s) written to {self.output_dir}")
        return None
