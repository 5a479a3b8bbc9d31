"""Saving and reloading upscaled SMILE models as safetensors, written atomically.

A generic (non-HF-config) SMILE model is stored as ``smile.safetensors`` plus ``smile.json``
listing every ``SmileLinear`` and its shape, and the groups of tied tensors (tied input/output
embeddings: T5, BART, GPT-2, Gemma2, tied Llama/Qwen2), which safetensors stores once under one of
their names; reloading rebuilds those modules inside a fresh copy of the pretrained architecture,
ties each group again and loads the weights strictly (no pickles, no ``torch.load``). Manifests
written before the ``tied`` list existed are reloaded with the base model's own ties.
The directory deliberately has neither ``config.json`` nor ``model.safetensors``: a plain
``from_pretrained`` fails on it instead of loading the pretrained weights and dropping the experts
(transformers falls back to a default config, which is CLIP ViT-B/32's). Format 1 checkpoints
(weights in ``model.safetensors``) still load. ``SMILE_FORMAT`` lets the model pools' atomic save
write such models this way (registered by plugin.py).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import safetensors
import safetensors.torch
from torch import nn

from fusion_bench_pave.io.atomic import atomic_output_dir
from fusion_bench_pave.io.formats import ModelFormat
from fusion_bench_pave.linear_layers import linear_features
from fusion_bench_pave.smile.linear import SmileLinear
from fusion_bench_pave.smile.upscale import set_module

MANIFEST = "smile.json"
WEIGHTS = "smile.safetensors"
FORMAT = "fusion_bench_pave.smile/2"
WEIGHTS_OF_FORMAT = {FORMAT: WEIGHTS, "fusion_bench_pave.smile/1": "model.safetensors"}
SAME_BASE = "load into the pretrained model the SMILE model was built from"


def smile_manifest(model: nn.Module) -> dict:
    """JSON-able description of every ``SmileLinear`` in ``model`` (enough to rebuild it)."""
    modules = {
        name: {
            "in_features": m.in_features, "out_features": m.out_features, "num_experts": m.num_experts,
            "gate_k": m.gate_k, "k": m.k, "top_k": m.top_k, "bias": m.bias is not None,
        }
        for name, m in model.named_modules() if isinstance(m, SmileLinear)
    }
    return {"format": FORMAT, "modules": modules, "tied": tied_tensors(model)}


def tied_tensors(model: nn.Module) -> list[list[str]]:
    """Sorted groups of state-dict names that are one tensor (the same memory, shape and strides),
    e.g. an embedding and the output projection tied to it: safetensors stores each group once."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, t in model.state_dict(keep_vars=True).items():
        if t.device.type != "meta" and t.numel():
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            groups[view].append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def tie_tensors(model: nn.Module, groups: list[list[str]], path: Path) -> None:
    """Make every name of each group refer to the group's first tensor (as saved)."""
    tensors = model.state_dict(keep_vars=True)
    for group in groups:
        missing = [name for name in group if name not in tensors]
        if missing:
            raise ValueError(f"{path / MANIFEST}: tied tensors {missing} are not in the base model; {SAME_BASE}")
        first = tensors[group[0]]
        for name in group[1:]:
            if (tensors[name].shape, tensors[name].dtype) != (first.shape, first.dtype):
                raise ValueError(f"{path / MANIFEST}: {name} {tuple(tensors[name].shape)} {tensors[name].dtype} cannot be tied to "
                                 f"{group[0]} {tuple(first.shape)} {first.dtype}; {SAME_BASE}")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, first)


def needs_smile_format(model: nn.Module) -> bool:
    """True for a model with ``SmileLinear`` layers that its own ``from_pretrained`` cannot rebuild
    (any architecture except the registered SMILE causal LMs, whose config describes the experts)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return not model_type.startswith("smile_") and any(isinstance(m, SmileLinear) for m in model.modules())


def write_smile_files(model: nn.Module, directory: Path) -> None:
    """The weights and the manifest of ``model`` into the existing ``directory``."""
    safetensors.torch.save_model(model, str(directory / WEIGHTS))
    (directory / MANIFEST).write_text(json.dumps(smile_manifest(model), indent=2))


SMILE_FORMAT = ModelFormat(
    claims=needs_smile_format,
    write=write_smile_files,
    note=f"SMILE model saved as {MANIFEST} + {WEIGHTS} (no config.json, so from_pretrained cannot silently drop "
    "the experts); reload it with fusion_bench_pave.io.smile.load_smile_model(pretrained_model, path)",
)


def save_smile_model(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` (state dict as safetensors + manifest) to the directory ``path`` atomically."""
    with atomic_output_dir(path, overwrite) as tmp:
        write_smile_files(model, tmp)
    return Path(path)


def is_smile_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file() and any((Path(path) / w).is_file() for w in WEIGHTS_OF_FORMAT.values())


def load_smile_model(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the SMILE model saved at ``path`` inside ``base`` (the pretrained architecture, modified
    in place): its ``SmileLinear`` modules, its tied tensors tied again, then every weight loaded strictly."""
    path = Path(path)
    if not is_smile_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a SMILE checkpoint (expected {MANIFEST} and {WEIGHTS})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") not in WEIGHTS_OF_FORMAT:
        raise ValueError(f"{path / MANIFEST}: unsupported format {manifest.get('format')!r}, expected {FORMAT!r}")
    weights = path / WEIGHTS_OF_FORMAT[manifest["format"]]
    tied = manifest["tied"] if "tied" in manifest else tied_tensors(base)
    for name, spec in manifest["modules"].items():
        try:
            old = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path / MANIFEST}: the base model has no module {name}; {SAME_BASE}") from None
        if linear_features(old) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"{name}: checkpoint expects a Linear({spec['in_features']}, {spec['out_features']}) or Conv1D, base model has {old}")
        set_module(base, name, SmileLinear(device=old.weight.device, dtype=old.weight.dtype, **spec))
    tie_tensors(base, tied, path)
    try:
        safetensors.torch.load_model(base, str(weights), strict=True)
    except (safetensors.SafetensorError, FileNotFoundError) as error:
        raise ValueError(f"{weights}: missing, corrupt or truncated safetensors file ({error}); delete {path} and upscale again") from error
    except RuntimeError as error:  # missing / unexpected keys or shapes (torch's load_state_dict)
        raise ValueError(f"{weights} does not fit the base model ({error}); {SAME_BASE}") from error
    return base
