"""A causal LM's module tree on the meta device, filled in one piece at a time from a checkpoint.

Built from the config alone (no weights), it gives the state-dict names in module order, which names
share one tensor (tied embeddings: the checkpoint stores one of them), and modules that take real
weights only while they are in use, so streaming code never holds more than one layer.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


def meta_causal_lm(config: PretrainedConfig) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config(config)`` with every parameter and buffer on the meta device."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def stored_names(model: nn.Module, stored: Container[str], where: str = "the checkpoint") -> dict[str, str]:
    """State-dict name -> name of the checkpoint tensor that holds it, for every entry of ``model``'s
    state dict; names that share one tensor (tied weights) map to the one ``stored`` holds."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    out = {}
    for names in groups.values():
        present = [name for name in names if name in stored]
        if not present:
            raise ValueError(f"{where} has no tensor {' / '.join(names)}; it does not match the config's architecture")
        out |= dict.fromkeys(names, present[0])
    return out


def load_module_(module: nn.Module, prefix: str, checkpoint: Mapping[str, Tensor], names: Mapping[str, str],
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Give the meta ``module`` (named ``prefix`` in the model) its weights from ``checkpoint``, cast to
    ``dtype`` (floating tensors; None keeps the checkpoint's) and moved to ``device``."""
    state = {}
    for key, meta in module.state_dict().items():
        tensor = checkpoint[names[prefix + key]]
        if tensor.shape != meta.shape:
            raise ValueError(f"{names[prefix + key]}: shape {tuple(tensor.shape)} in the checkpoint, "
                             f"{tuple(meta.shape)} in the config's architecture")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.to(device) if device is not None else tensor
    module.load_state_dict(state, strict=True, assign=True)
    return module


def release_module_(module: nn.Module) -> None:
    """Drop ``module``'s weights (back to the meta device)."""
    module.to("meta")
