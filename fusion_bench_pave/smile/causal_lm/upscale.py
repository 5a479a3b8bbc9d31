"""SMILE upscaling of Mistral / Llama / Qwen2 / Gemma2 / Phi3 causal LMs, in memory or streamed from safetensors.

The SMILE model's state dict is planned from the inputs' shapes alone (``plan_smile_causal_lm``:
one ``Unit`` per decoder projection or copied tensor, with its output names, shapes and per-layer
ranks), then computed unit by unit (``write_units``), reading the pretrained and fine-tuned tensors
one projection at a time from any ``Mapping[str, Tensor]`` (a ``state_dict()`` or a lazy
``io.safetensors.LazyTensors``). Streamed into a ``ShardWriter``, peak memory is one projection's
worth of tensors (x T+1) plus one output shard, whatever the depth; under Fabric DDP each rank
computes and writes only its shards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from fusion_bench_pave.io.safetensors import LazyTensors, ShardWriter, copy_tokenizer_files
from fusion_bench_pave.io.shared_output import shared_atomic_output_dir
from fusion_bench_pave.ranks import raise_if_any_failed, rank_and_size, sum_over_ranks
from fusion_bench_pave.smile.causal_lm.configuration import SMILE_CONFIGS
from fusion_bench_pave.smile.causal_lm.modeling import SMILE_CAUSAL_LMS, SMILE_PROJECTIONS, decoder_key, projection_pattern
from fusion_bench_pave.smile.decompose import check_layer_inputs, check_layer_shapes, layer_changed, layer_ranks, smile_tensors
from fusion_bench_pave.smile.linear import smile_layout
from fusion_bench_pave.smile.svd import SvdMethod
from fusion_bench_pave.smile.upscale import clamped_ranks, log_clamped_ranks

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


def check_request(base: PretrainedConfig, num_local_experts: int, settings: SmileSettings) -> None:
    """Refuse an unsupported model type, T=0 or num_experts_per_tok outside [1, T]."""
    if base.model_type not in SMILE_CONFIGS:
        raise ValueError(f"SMILE causal-LM upscaling supports model types {sorted(SMILE_CONFIGS)}, got {base.model_type!r}")
    if num_local_experts < 1:
        raise ValueError("no fine-tuned models given (T=0); SMILE needs at least one expert")
    if not 1 <= settings.num_experts_per_tok <= num_local_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, {num_local_experts}] (the number of fine-tuned models), got {settings.num_experts_per_tok}")


def smile_config_from(
    base: PretrainedConfig, num_local_experts: int, settings: SmileSettings, ranks: Mapping[str, tuple[int, int]] | None = None,
) -> PretrainedConfig:
    """The SMILE config for a base Mistral / Llama / Qwen2 / Gemma2 / Phi3 config; ``ranks`` (projection
    name -> (gate_k, k)) go into ``layer_ranks`` where they differ from the settings' ranks."""
    check_request(base, num_local_experts, settings)
    fields = {key: value for key, value in base.to_dict().items() if key not in _NOT_COPIED}
    cls = SMILE_CONFIGS[base.model_type]
    config = cls(**fields, num_local_experts=num_local_experts, num_experts_per_tok=settings.num_experts_per_tok,
                 rank_of_router=settings.rank_of_router, rank_of_expert=settings.rank_of_expert,
                 layer_ranks={decoder_key(name): list(layer) for name, layer in
                              clamped_ranks(dict(ranks or {}), settings.rank_of_router, settings.rank_of_expert).items()})
    config.architectures = [SMILE_CAUSAL_LMS[base.model_type].__name__]
    return config


class Unit(NamedTuple):
    """One step of the SMILE causal LM's state dict: a decoder projection ``name`` (``ranks`` its
    (gate_k, k); its ``SmileLinear`` tensors) or one tensor ``name`` copied from the base (``ranks`` None).
    ``outputs``: the output tensors' names, shapes and dtypes, in order, known before any is computed."""

    name: str
    outputs: dict[str, tuple[torch.Size, torch.dtype]]
    ranks: tuple[int, int] | None = None


def _spec(source: Mapping[str, Tensor], name: str, which: str) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of ``source[name]`` without reading a lazy checkpoint's data."""
    if name not in source:
        raise ValueError(f"{name}: missing in the {which} checkpoint; all models must share the pretrained architecture")
    if isinstance(source, LazyTensors):
        return source.spec(name)
    return source[name].shape, source[name].dtype


def _meta(source: Mapping[str, Tensor], name: str, which: str) -> Tensor:
    shape, dtype = _spec(source, name, which)
    return torch.empty(shape, dtype=dtype, device="meta")


def plan_smile_causal_lm(
    base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], settings: SmileSettings, model_type: str,
) -> list[Unit]:
    """The units of the SMILE causal LM in ``base``'s order, from the checkpoints' shapes alone.

    The decoder projections of the ``model_type`` family (``SMILE_PROJECTIONS``) become ``SmileLinear``
    tensors (``<proj>.weight``, ``.router``, ``.expert_u``, ...) with the ranks ``decompose.layer_ranks``
    gives them (clamped per projection to its full rank, as ``smile_upscaling`` does; the clamped ones
    are logged); every other tensor (embeddings, norms, lm_head) is the pretrained one. Raises, before
    any tensor is read, for T=0, missing tensors, shape mismatches or rank_of_router < 1.
    """
    if not experts:
        raise ValueError("no fine-tuned models given (T=0); SMILE needs at least one expert")
    projection_weight = projection_pattern(SMILE_PROJECTIONS[model_type], ".weight")
    projection_bias = projection_pattern(SMILE_PROJECTIONS[model_type], ".bias")
    units = []
    for name in base:
        if projection_bias.fullmatch(name):
            continue  # a unit with its weight
        shape, dtype = _spec(base, name, "pretrained")
        if not projection_weight.fullmatch(name):
            units.append(Unit(name, {name: (shape, settings.model_dtype if settings.model_dtype is not None and dtype.is_floating_point else dtype)}))
            continue
        module, bias = name.removesuffix(".weight"), name.removesuffix("weight") + "bias"
        has_bias = bias in base
        ranks = layer_ranks(shape, settings.rank_of_router, settings.rank_of_expert)
        check_layer_shapes(
            module, _meta(base, name, "pretrained"), [_meta(e, name, f"fine-tuned #{i}") for i, e in enumerate(experts)],
            _meta(base, bias, "pretrained") if has_bias else None,
            [_meta(e, bias, f"fine-tuned #{i}") if has_bias else None for i, e in enumerate(experts)], *ranks,
        )
        layout = smile_layout(shape[1], shape[0], len(experts), *ranks, has_bias)
        units.append(Unit(module, {f"{module}.{key}": (torch.Size(size), settings.model_dtype or dtype) for key, size in layout.items()}, ranks))
    if not any(unit.ranks for unit in units):
        raise ValueError(f"no {model_type} decoder projections (layers.<i>.{SMILE_PROJECTIONS[model_type][0]}.weight, ...) "
                         "found in the pretrained checkpoint")
    log_clamped_ranks(projection_ranks(units), settings.rank_of_router, settings.rank_of_expert)
    return units


def projection_ranks(units: Sequence[Unit]) -> dict[str, tuple[int, int]]:
    """Projection name -> (gate_k, k) of the projection units."""
    return {unit.name: unit.ranks for unit in units if unit.ranks is not None}


def nbytes(unit: Unit) -> dict[str, int]:
    """Output tensor name -> bytes."""
    return {name: shape.numel() * dtype.itemsize for name, (shape, dtype) in unit.outputs.items()}


def unit_tensors(unit: Unit, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], settings: SmileSettings) -> tuple[dict[str, Tensor], bool]:
    """The output tensors of ``unit`` and whether it is a projection some fine-tuned model changed
    (an unchanged one gets zero router and experts: output = pretrained)."""
    if unit.ranks is None:
        ((name, (_, dtype)),) = unit.outputs.items()
        return {name: base[name].to(dtype)}, False
    weight, bias = f"{unit.name}.weight", f"{unit.name}.bias"
    w0, ws = base[weight], [e[weight] for e in experts]
    b0 = base.get(bias)
    bs = [e[bias] if b0 is not None else None for e in experts]
    check_layer_inputs(unit.name, w0, ws, b0, bs, *unit.ranks)
    if not layer_changed(w0, ws, b0, bs):
        pretrained = {weight: w0, bias: b0}
        return {name: pretrained[name].to(dtype) if name in pretrained else torch.zeros(shape, dtype=dtype)
                for name, (shape, dtype) in unit.outputs.items()}, False
    tensors = smile_tensors(w0, ws, b0, bs, *unit.ranks, True, settings.svd_method, settings.compute_device,
                            unit.outputs[weight][1], name=unit.name)
    return {f"{unit.name}.{key}": tensor for key, tensor in tensors.items()}, True


def write_units(
    units: Sequence[Unit],
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    settings: SmileSettings,
    sink: Callable[[str, Tensor], None],
    take: Callable[[Unit], bool] = lambda unit: True,
    progress: bool = True,
) -> int:
    """Hand the tensors of every unit ``take`` accepts to ``sink``, one unit at a time, in order
    (only those units are read and computed); the number of changed projections among them."""
    changed = 0
    bar = tqdm(total=len(projection_ranks(units)), desc="SMILE upscaling projections", disable=not progress, dynamic_ncols=True)
    for unit in units:
        if take(unit):
            tensors, unit_changed = unit_tensors(unit, base, experts, settings)
            changed += unit_changed
            for name, tensor in tensors.items():
                sink(name, tensor)
            del tensors
        bar.update(unit.ranks is not None)
    bar.close()
    return changed


def require_change(changed: int, units: Sequence[Unit]) -> None:
    """Raise if no projection changed; else log how many did."""
    if changed == 0:
        raise ValueError("no decoder projection differs between the pretrained and the fine-tuned models; nothing to upscale")
    log.info("SMILE: upscaled %d of %d projections (the rest got zero experts)", changed, len(projection_ranks(units)))


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
    fabric: Any | None = None,
) -> Path:
    """Stream-upscale safetensors checkpoints into a SMILE checkpoint at ``out_path`` (written atomically).

    Loadable with ``AutoModelForCausalLM.from_pretrained(out_path)`` after importing
    ``fusion_bench_pave.smile.causal_lm``. Tokenizer and generation files are copied from the base;
    ``extra_files`` (name -> text) are written beside them, in the same atomic step.

    With a Lightning ``fabric`` of several processes, call it on every rank: output shard ``i`` is
    computed and written by rank ``i % world_size`` (``ShardWriter``; shards never split a
    projection) into one staging directory on a filesystem all ranks share, and rank 0 publishes it
    when every rank succeeded. The files hold the same tensors as one process writes (bit for bit at
    the same per-process torch thread count); ``max_shard_bytes`` sets the granularity of the split.
    """
    base_path, base_config = Path(base_path), AutoConfig.from_pretrained(base_path)
    check_request(base_config, len(expert_paths), settings)
    base, experts = LazyTensors(base_path), [LazyTensors(p) for p in expert_paths]
    units = plan_smile_causal_lm(base, experts, settings, base_config.model_type)
    config = smile_config_from(base_config, len(expert_paths), settings, projection_ranks(units))
    if settings.model_dtype is not None:
        config.dtype = settings.model_dtype
    rank, world_size = rank_and_size(fabric)
    with shared_atomic_output_dir(out_path, overwrite, fabric) as tmp:
        error, changed = None, 0
        try:
            writer = ShardWriter(tmp, max_shard_bytes, rank, world_size)
            changed = write_units(units, base, experts, settings, writer.write, lambda unit: writer.claim(nbytes(unit)),
                                  progress and rank == 0)
            writer.close()
            if rank == 0:
                config.save_pretrained(tmp)
                copy_tokenizer_files(base_path, tmp)
                for name, text in (extra_files or {}).items():
                    (tmp / name).write_text(text)
                if writer.shard_count < world_size:
                    log.warning("SMILE: %d output shard(s) for %d ranks, so some ranks had nothing to do; lower "
                                "max_shard_gb to share the work", writer.shard_count, world_size)
        except Exception as caught:  # noqa: BLE001 (every rank learns of it below, before the next collective)
            error = caught
        raise_if_any_failed(fabric, error, "SMILE upscaling")
        require_change(sum_over_ranks(fabric, changed), units)
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
    check_request(pretrained.config, len(finetuned), settings)
    base, experts = pretrained.state_dict(), [m.state_dict() for m in finetuned]
    units = plan_smile_causal_lm(base, experts, settings, pretrained.config.model_type)
    config = smile_config_from(pretrained.config, len(finetuned), settings, projection_ranks(units))
    state: dict[str, Tensor] = {}
    require_change(write_units(units, base, experts, settings, state.__setitem__, progress=progress), units)
    model = SMILE_CAUSAL_LMS[pretrained.config.model_type](config).to(settings.model_dtype or pretrained.dtype)
    model.load_state_dict(state, strict=True)
    return model.to(pretrained.device).eval()
