"""Saving and reloading upscaled SMILE models as safetensors, written atomically.

A generic (non-HF-config) SMILE model is stored as ``smile.safetensors`` plus ``smile.json``
listing every ``SmileLinear`` and its shape; reloading rebuilds those modules inside a fresh copy
of the pretrained architecture and loads the weights strictly (no pickles, no ``torch.load``).
The directory deliberately has neither ``config.json`` nor ``model.safetensors``: a plain
``from_pretrained`` fails on it instead of loading the pretrained weights and dropping the experts
(transformers falls back to a default config, which is CLIP ViT-B/32's). Format 1 checkpoints
(weights in ``model.safetensors``) still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
from torch import nn

from fusion_bench_pave.atomic import atomic_output_dir
from fusion_bench_pave.linear_layers import linear_features
from fusion_bench_pave.smile.linear import SmileLinear
from fusion_bench_pave.smile.upscale import set_module

MANIFEST = "smile.json"
WEIGHTS = "smile.safetensors"
FORMAT = "fusion_bench_pave.smile/2"
WEIGHTS_OF_FORMAT = {FORMAT: WEIGHTS, "fusion_bench_pave.smile/1": "model.safetensors"}


def smile_manifest(model: nn.Module) -> dict:
    """JSON-able description of every ``SmileLinear`` in ``model`` (enough to rebuild it)."""
    modules = {
        name: {
            "in_features": m.in_features, "out_features": m.out_features, "num_experts": m.num_experts,
            "gate_k": m.gate_k, "k": m.k, "top_k": m.top_k, "bias": m.bias is not None,
        }
        for name, m in model.named_modules() if isinstance(m, SmileLinear)
    }
    return {"format": FORMAT, "modules": modules}


def needs_smile_format(model: nn.Module) -> bool:
    """True for a model with ``SmileLinear`` layers that its own ``from_pretrained`` cannot rebuild
    (any architecture except the registered SMILE causal LMs, whose config describes the experts)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return not model_type.startswith("smile_") and any(isinstance(m, SmileLinear) for m in model.modules())


def write_smile_files(model: nn.Module, directory: Path) -> None:
    """The weights and the manifest of ``model`` into the existing ``directory``."""
    safetensors.torch.save_model(model, str(directory / WEIGHTS))
    (directory / MANIFEST).write_text(json.dumps(smile_manifest(model), indent=2))


def save_smile_model(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` (state dict as safetensors + manifest) to the directory ``path`` atomically."""
    with atomic_output_dir(path, overwrite) as tmp:
        write_smile_files(model, tmp)
    return Path(path)


def is_smile_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file() and any((Path(path) / w).is_file() for w in WEIGHTS_OF_FORMAT.values())


def load_smile_model(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the SMILE model saved at ``path`` inside ``base`` (the pretrained architecture, modified in place)."""
    path = Path(path)
    if not is_smile_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a SMILE checkpoint (expected {MANIFEST} and {WEIGHTS})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") not in WEIGHTS_OF_FORMAT:
        raise ValueError(f"{path / MANIFEST}: unsupported format {manifest.get('format')!r}, expected {FORMAT!r}")
    weights = path / WEIGHTS_OF_FORMAT[manifest["format"]]
    for name, spec in manifest["modules"].items():
        old = base.get_submodule(name)
        if linear_features(old) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"{name}: checkpoint expects a Linear({spec['in_features']}, {spec['out_features']}) or Conv1D, base model has {old}")
        set_module(base, name, SmileLinear(device=old.weight.device, dtype=old.weight.dtype, **spec))
    try:
        safetensors.torch.load_model(base, str(weights), strict=True)
    except (safetensors.SafetensorError, FileNotFoundError) as error:
        raise ValueError(f"{weights}: missing, corrupt or truncated safetensors file ({error}); delete {path} and upscale again") from error
    return base
