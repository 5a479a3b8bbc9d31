"""FusionBench algorithm classes for SMILE upscaling (thin shells over the pure functions)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from fusion_bench import BaseAlgorithm
from fusion_bench.mixins import auto_register_config
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils.dtype import parse_dtype
from torch import nn

from fusion_bench_pave.smile.io import load_smile_model, save_smile_model
from fusion_bench_pave.smile.svd import SvdMethod
from fusion_bench_pave.smile.upscale import upscale_model

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device | None:
    """``torch.device`` for ``device``, falling back to CPU (with a warning) when CUDA is unavailable."""
    if device is None:
        return None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is unavailable; using cpu", device)
        return torch.device("cpu")
    return torch.device(device)


@auto_register_config
class SmileUpscalingAlgorithm(BaseAlgorithm):
    """Upscale the pool's pretrained model with its fine-tuned models into a SMILE MoE model.

    Hyperparameter names follow FusionBench's ``SmileUpscalingAlgorithm``: ``gate_k`` (router
    rank), ``k`` (expert rank, <= 0 for dense experts), ``top_k``, ``routing_use_diff``,
    ``average_experts``, ``device`` (where the models live), ``upscaling_accelerator`` (where SVDs
    run), ``model_path`` (cache: loaded if it exists, else the result is saved there). Extra:
    ``target_modules`` (regexes over module names, default all ``nn.Linear``), ``dtype`` of the
    result, ``svd_method`` (auto | full | randomized).
    """

    def __init__(
        self,
        gate_k: int = 1,
        k: int = 128,
        top_k: int = 1,
        routing_use_diff: bool = True,
        average_experts: bool = False,
        target_modules: Sequence[str] | None = None,
        dtype: str | None = None,
        svd_method: SvdMethod = "auto",
        device: str = "cpu",
        upscaling_accelerator: str | None = None,
        model_path: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | dict[str, nn.Module]) -> nn.Module:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        device = resolve_device(self.device)
        if self.model_path is not None and Path(self.model_path).exists():
            log.info("loading cached SMILE model from %s", self.model_path)
            return load_smile_model(modelpool.load_pretrained_model().to(device), self.model_path)
        pretrained = modelpool.load_pretrained_model().to(device)
        finetuned = [m.to(device) for m in modelpool.models()]
        model, _ = upscale_model(
            pretrained,
            finetuned,
            gate_k=self.gate_k,
            k=self.k,
            top_k=self.top_k,
            routing_use_diff=self.routing_use_diff,
            average_experts=self.average_experts,
            target_modules=None if self.target_modules is None else list(self.target_modules),
            svd_method=self.svd_method,
            compute_device=resolve_device(self.upscaling_accelerator),
            dtype=parse_dtype(self.dtype),
        )
        if self.model_path is not None:
            save_smile_model(model, self.model_path)
        return model
