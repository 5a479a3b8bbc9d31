"""SMILE upscaling of Mistral / Llama / Qwen2 / Gemma2 / Phi3 causal LMs, in memory or streamed from safetensors.

The core is a generator over (name, tensor) pairs of the SMILE model's state dict that reads the
pretrained and fine-tuned tensors one projection at a time from any ``Mapping[str, Tensor]`` (a
``state_dict()`` or a lazy ``io.safetensors.LazyTensors``). Streamed into a ``ShardWriter``, peak
memory is one projection's worth of tensors (x T+1) plus one output shard, whatever the depth.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from fusion_bench_pave.io.atomic import atomic_output_dir
from fusion_bench_pave.io.safetensors import LazyTensors, ShardWriter, copy_tokenizer_files
from fusion_bench_pave.smile.causal_lm.configuration import SMILE_CONFIGS
from fusion_bench_pave.smile.causal_lm.modeling import SMILE_CAUSAL_LMS, SMILE_PROJECTIONS, projection_pattern
from fusion_bench_pave.smile.decompose import check_layer_inputs, layer_changed, smile_tensors
from fusion_bench_pave.smile.linear import smile_layout
from fusion_bench_pave.smile.svd import SvdMethod

log = logging.getLogger(__name__)

_NOT_COPIED = ("model_type", "architectures", "transformers_version", "_name_or_path")


@dataclass(frozen=True)
class SmileSettings:
    """The SMILE causal-LM upscaling settings, named as in FusionBench's ``SmileMistralUpscalingAlgorithm``.

    ``rank_of_expert`` <= 0 gives dense experts; ``model_dtype`` None keeps the pretrained dtype;
    ``compute_device`` is where the SVDs run (None: where the weights are).
    """

    num_experts_per_tok: int = 1
    rank_of_router: int = 8
    rank_of_expert: int = 512
    model_dtype: torch.dtype | None = None
    svd_method: SvdMethod = "auto"
    compute_device: torch.device | str | None = None


def smile_config_from(base: PretrainedConfig, num_local_experts: int, settings: SmileSettings) -> PretrainedConfig:
    """The SMILE config for a base Mistral / Llama / Qwen2 / Gemma2 / Phi3 config."""
    if base.model_type not in SMILE_CONFIGS:
        raise ValueError(f"SMILE causal-LM upscaling supports model types {sorted(SMILE_CONFIGS)}, got {base.model_type!r}")
    if num_local_experts < 1:
        raise ValueError("no fine-tuned models given (T=0); SMILE needs at least one expert")
    if not 1 <= settings.num_experts_per_tok <= num_local_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, {num_local_experts}] (the number of fine-tuned models), got {settings.num_experts_per_tok}")
    fields = {key: value for key, value in base.to_dict().items() if key not in _NOT_COPIED}
    cls = SMILE_CONFIGS[base.model_type]
    config = cls(**fields, num_local_experts=num_local_experts, num_experts_per_tok=settings.num_experts_per_tok,
                 rank_of_router=settings.rank_of_router, rank_of_expert=settings.rank_of_expert)
    config.architectures = [SMILE_CAUSAL_LMS[base.model_type].__name__]
    return config


def _placeholder(w0: Tensor, b0: Tensor | None, num_experts: int, gate_k: int, k: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Zero router and experts for a projection no fine-tuned model changed (output = pretrained)."""
    m, n = w0.shape
    pretrained = {"weight": w0, "bias": b0}
    return {
        key: pretrained[key].to(dtype) if key in pretrained else torch.zeros(shape, dtype=dtype)
        for key, shape in smile_layout(n, m, num_experts, gate_k, k, b0 is not None).items()
    }


def _get(source: Mapping[str, Tensor], name: str, which: str) -> Tensor:
    try:
        return source[name]
    except KeyError:
        raise ValueError(f"{name}: missing in the {which} checkpoint; all models must share the pretrained architecture") from None


def smile_causal_lm_tensors(
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    settings: SmileSettings,
    model_type: str,
    progress: bool = True,
) -> Iterator[tuple[str, Tensor]]:
    """Yield the SMILE causal LM's tensors in ``base``'s order; raise if no projection changed.

    The decoder projections of the ``model_type`` family (``SMILE_PROJECTIONS``) become
    ``SmileLinear`` tensors (``<proj>.weight``, ``.router``, ``.expert_u``, ...); every other
    tensor (embeddings, norms, lm_head) is the pretrained one.
    """
    if not experts:
        raise ValueError("no fine-tuned models given (T=0); SMILE needs at least one expert")
    rank_of_router, rank_of_expert, dtype = settings.rank_of_router, settings.rank_of_expert, settings.model_dtype
    projection_weight = projection_pattern(SMILE_PROJECTIONS[model_type], ".weight")
    projection_bias = projection_pattern(SMILE_PROJECTIONS[model_type], ".bias")
    names = list(base)
    n_proj = sum(bool(projection_weight.fullmatch(n)) for n in names)
    if n_proj == 0:
        raise ValueError(f"no {model_type} decoder projections (layers.<i>.{SMILE_PROJECTIONS[model_type][0]}.weight, ...) "
                         "found in the pretrained checkpoint")
    changed = 0
    bar = tqdm(total=n_proj, desc="SMILE upscaling projections", disable=not progress, dynamic_ncols=True)
    for name in names:
        if projection_bias.fullmatch(name):
            continue  # emitted with its weight
        if not projection_weight.fullmatch(name):
            tensor = base[name]
            yield name, tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
            continue
        prefix = name.removesuffix("weight")
        w0 = base[name]
        ws = [_get(e, name, f"fine-tuned #{i}") for i, e in enumerate(experts)]
        b0 = base[prefix + "bias"] if prefix + "bias" in base else None
        bs = [_get(e, prefix + "bias", f"fine-tuned #{i}") if b0 is not None else None for i, e in enumerate(experts)]
        check_layer_inputs(name.removesuffix(".weight"), w0, ws, b0, bs, rank_of_router, rank_of_expert)
        out_dtype = dtype or w0.dtype
        if layer_changed(w0, ws, b0, bs):
            tensors = smile_tensors(w0, ws, b0, bs, rank_of_router, rank_of_expert, True, settings.svd_method,
                                    settings.compute_device, out_dtype, name=name)
            changed += 1
        else:
            tensors = _placeholder(w0, b0, len(experts), rank_of_router, rank_of_expert, out_dtype)
        del ws, bs
        for key, tensor in tensors.items():
            yield prefix + key, tensor
        bar.update()
    bar.close()
    if changed == 0:
        raise ValueError("no decoder projection differs between the pretrained and the fine-tuned models; nothing to upscale")
    log.info("SMILE: upscaled %d of %d projections (the rest got zero experts)", changed, n_proj)


def upscale_causal_lm_checkpoint(
    base_path: str | os.PathLike,
    expert_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    settings: SmileSettings = SmileSettings(),
    *,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Stream-upscale safetensors checkpoints into a SMILE checkpoint at ``out_path`` (written atomically).

    Loadable with ``AutoModelForCausalLM.from_pretrained(out_path)`` after importing
    ``fusion_bench_pave.smile.causal_lm``. Tokenizer and generation files are copied from the base;
    ``extra_files`` (name -> text) are written beside them, in the same atomic step.
    """
    base_path = Path(base_path)
    config = smile_config_from(AutoConfig.from_pretrained(base_path), len(expert_paths), settings)
    if settings.model_dtype is not None:
        config.dtype = settings.model_dtype
    base = LazyTensors(base_path)
    experts = [LazyTensors(p) for p in expert_paths]
    with atomic_output_dir(out_path, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in smile_causal_lm_tensors(base, experts, settings, config.model_type.removeprefix("smile_"), progress):
            writer.add(name, tensor)
        writer.close()
        config.save_pretrained(tmp)
        copy_tokenizer_files(base_path, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_path)


@torch.no_grad()
def upscale_causal_lm(
    pretrained: PreTrainedModel,
    finetuned: Sequence[PreTrainedModel],
    settings: SmileSettings = SmileSettings(),
    *,
    progress: bool = True,
) -> PreTrainedModel:
    """In-memory variant of :func:`upscale_causal_lm_checkpoint` for already loaded models."""
    config = smile_config_from(pretrained.config, len(finetuned), settings)
    state = dict(smile_causal_lm_tensors(pretrained.state_dict(), [m.state_dict() for m in finetuned], settings,
                                         pretrained.config.model_type, progress))
    model = SMILE_CAUSAL_LMS[pretrained.config.model_type](config).to(settings.model_dtype or pretrained.dtype)
    model.load_state_dict(state, strict=True)
    return model.to(pretrained.device).eval()
