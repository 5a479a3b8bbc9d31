"""FusionBench algorithm classes for SMILE upscaling (thin shells over the pure functions)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from fusion_bench_pave import plugin  # noqa: F401,I001  (compat repair before fusion_bench imports)
from fusion_bench import BaseAlgorithm
from fusion_bench.mixins import LightningFabricMixin, auto_register_config
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils.dtype import parse_dtype
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from fusion_bench_pave.arguments import check_argument_types, constructor_arguments, reject_unknown_keys
from fusion_bench_pave.io.atomic import atomic_output_dir, refuse_replacing_dir
from fusion_bench_pave.io.shared_output import shared_atomic_output_dir, shared_temporary_dir
from fusion_bench_pave.io.safetensors import LazyTensors
from fusion_bench_pave.modelpool.checkpoints import safetensors_checkpoint_dir
from fusion_bench_pave.io.smile import is_smile_checkpoint, load_smile_model, write_smile_files
from fusion_bench_pave.smile.causal_lm.upscale import SmileSettings, upscale_causal_lm, upscale_causal_lm_checkpoint
from fusion_bench_pave.smile.record import RECORD, check_record, record_text, upscaling_record, write_record
from fusion_bench_pave.smile.svd import SvdMethod
from fusion_bench_pave.smile.upscale import upscale_model
from fusion_bench_pave.taskpool.compatibility import LANGUAGE_MODEL, check_taskpool_fits

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
    run), ``model_path`` (cache: loaded if it exists and was built with the same settings from the
    same models, refused if not; else the result is saved there with that record). Extra:
    ``target_modules`` (regexes over module names, default every ``nn.Linear`` / ``Conv1D`` but
    the task heads), ``dtype`` of the result, ``svd_method`` (auto | full | randomized). gate_k
    and k are clamped per layer to its full rank (``decompose.layer_ranks``).
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
        reject_unknown_keys(type(self), kwargs)
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | dict[str, nn.Module]) -> nn.Module:
        check_argument_types(type(self), constructor_arguments(self))
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        device = resolve_device(self.device)
        pretrained = modelpool.load_pretrained_model()
        check_taskpool_fits(self._program, modelpool, pretrained)
        finetuned = list(modelpool.models())
        record = None
        if self.model_path is not None:
            record = upscaling_record(self.settings(), dict(zip(["_pretrained_", *modelpool.model_names],
                                                                 [m.state_dict() for m in [pretrained, *finetuned]])))
            if Path(self.model_path).exists():
                if is_smile_checkpoint(self.model_path):  # else load_smile_model says what is missing
                    check_record(self.model_path, record)
                log.info("loading cached SMILE model from %s", self.model_path)
                return load_smile_model(pretrained.to(device), self.model_path)
        pretrained, finetuned = pretrained.to(device), [m.to(device) for m in finetuned]
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
            with atomic_output_dir(self.model_path) as tmp:
                write_smile_files(model, tmp)
                write_record(tmp, record)
        return model

    def settings(self) -> dict:
        """The settings that determine the result (stored with a saved model, compared on reuse)."""
        return {
            "method": "smile_upscaling", "gate_k": self.gate_k, "k": self.k, "top_k": self.top_k,
            "routing_use_diff": self.routing_use_diff, "average_experts": self.average_experts,
            "target_modules": None if self.target_modules is None else list(self.target_modules),
            "dtype": parse_dtype(self.dtype), "svd_method": self.svd_method,
            "layer_rules": "heads kept unless targeted; ranks clamped per layer",
        }


@auto_register_config
class SmileMistralUpscalingAlgorithm(LightningFabricMixin, BaseAlgorithm):
    """SMILE-upscale a Mistral / Llama / Qwen2 / Gemma2 / Phi3 causal LM into a ``Smile*ForCausalLM``.

    When every pool entry is a safetensors checkpoint (local directory or hub id) they are streamed
    tensor by tensor (peak memory independent of depth) into ``model_path`` (or a temporary directory),
    which is then loaded with ``AutoModelForCausalLM``; otherwise the loaded models are upscaled in
    memory. Names follow FusionBench's ``SmileMistralUpscalingAlgorithm``: ``num_experts_per_tok``,
    ``rank_of_router``, ``rank_of_expert`` (<= 0: dense experts; both clamped per projection to its
    full rank, as ``smile_upscaling`` does), ``model_dtype``, ``device``, ``accelerator`` (SVD device),
    ``model_path`` (if it exists and ``overwrite`` is false: loaded when built with the same settings
    from the same models, refused otherwise). Under Fabric DDP the ranks share the streamed output's
    shards (``upscale_causal_lm_checkpoint``), written to ``model_path`` (or rank 0's temporary
    directory), which must be on a filesystem every rank sees; every rank returns the model.
    """

    def __init__(
        self,
        num_experts_per_tok: int = 1,
        rank_of_router: int = 8,
        rank_of_expert: int = 512,
        model_dtype: str | None = None,
        svd_method: SvdMethod = "auto",
        device: str = "cpu",
        accelerator: str | None = None,
        model_path: str | None = None,
        overwrite: bool = False,
        max_shard_gb: float = 2.0,
        **kwargs,
    ) -> None:
        reject_unknown_keys(type(self), kwargs)
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | dict[str, PreTrainedModel]) -> PreTrainedModel:
        check_argument_types(type(self), constructor_arguments(self))
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        check_taskpool_fits(self._program, modelpool, LANGUAGE_MODEL)
        device, fabric = resolve_device(self.device), self.fabric
        accelerator = resolve_device(self.accelerator)
        if fabric.world_size > 1 and accelerator is not None and accelerator.type == fabric.device.type == "cuda":
            accelerator = fabric.device  # each rank's own GPU
        smile = SmileSettings(
            num_experts_per_tok=self.num_experts_per_tok, rank_of_router=self.rank_of_router,
            rank_of_expert=self.rank_of_expert, model_dtype=parse_dtype(self.model_dtype),
            svd_method=self.svd_method, compute_device=accelerator,
        )
        names = ["_pretrained_", *modelpool.model_names]
        dirs = [safetensors_checkpoint_dir(modelpool, n) for n in names]
        models = None if all(dirs) else [modelpool.load_pretrained_model(), *modelpool.models()]
        record = None
        if self.model_path is not None:
            inputs = [LazyTensors(d) for d in dirs] if models is None else [m.state_dict() for m in models]
            record = upscaling_record(self.settings(), dict(zip(names, inputs)))
            if Path(self.model_path).exists() and not self.overwrite:
                check_record(self.model_path, record)
                log.info("loading cached SMILE model from %s", self.model_path)
                return AutoModelForCausalLM.from_pretrained(self.model_path).to(device)
        if models is None:
            with shared_temporary_dir(fabric) as scratch:
                out = self.model_path or scratch / "smile"
                upscale_causal_lm_checkpoint(
                    dirs[0], dirs[1:], out, smile, max_shard_bytes=int(self.max_shard_gb * 2**30), overwrite=self.overwrite,
                    extra_files={} if record is None else {RECORD: record_text(record)}, fabric=fabric,
                    progress=fabric.is_global_zero,
                )
                return AutoModelForCausalLM.from_pretrained(out).to(device).eval()
        log.info("pool entries are not all safetensors checkpoints; upscaling in memory%s",
                 " (on every rank: only streamed checkpoints are shared across ranks)" if fabric.world_size > 1 else "")
        if self.model_path is not None:
            refuse_replacing_dir(self.model_path, self.overwrite)  # before the work, not after it
        model = upscale_causal_lm(models[0].to(device), [m.to(device) for m in models[1:]], smile)
        if self.model_path is not None:
            with shared_atomic_output_dir(self.model_path, self.overwrite, fabric) as tmp:
                if fabric.is_global_zero:
                    model.save_pretrained(tmp)
                    write_record(tmp, record)
        return model

    def settings(self) -> dict:
        """The settings that determine the result (stored with a saved model, compared on reuse)."""
        return {
            "method": "smile_mistral_upscaling", "num_experts_per_tok": self.num_experts_per_tok,
            "rank_of_router": self.rank_of_router, "rank_of_expert": self.rank_of_expert,
            "model_dtype": parse_dtype(self.model_dtype), "svd_method": self.svd_method,
        }
