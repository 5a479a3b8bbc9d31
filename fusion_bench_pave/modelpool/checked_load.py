"""Model-pool mixin whose ``load_model`` names the pool entry and path when a checkpoint is missing
or corrupt, instead of the hub's "Repo id must be in the form ..." or safetensors' bare
"Error while deserializing header"."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from safetensors import SafetensorError
from torch import nn


def model_source(models: Mapping[str, Any], model_name_or_config: Any) -> tuple[str, str | None]:
    """(entry name, checkpoint path or hub id) of a pool entry or model config; path None if unknown."""
    if isinstance(model_name_or_config, str) and model_name_or_config in models:
        name, entry = model_name_or_config, models[model_name_or_config]
    else:
        name, entry = "<config>", model_name_or_config
    if isinstance(entry, str):
        return name, entry
    if isinstance(entry, Mapping):
        return name, entry.get("pretrained_model_name_or_path")
    return name, None


def is_local_path(source: str) -> bool:
    """Absolute, ./ or ~ paths, and anything with more than one '/' (hub ids are 'org/name')."""
    return os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1


class CheckedLoadMixin:
    """``load_model`` that fails with the entry name and path for missing or corrupt checkpoints."""

    def load_model(self, model_name_or_config: Any, *args: Any, **kwargs: Any) -> nn.Module:
        name, source = model_source(self._models, model_name_or_config)
        if source is not None and is_local_path(source) and not os.path.exists(os.path.expanduser(source)):
            raise FileNotFoundError(f"model '{name}': checkpoint path {source} does not exist (fix modelpool.models.{name})")
        try:
            return super().load_model(model_name_or_config, *args, **kwargs)
        except SafetensorError as error:
            raise ValueError(
                f"model '{name}': {source} holds a corrupt or truncated safetensors file ({error}); "
                "re-create or re-download the checkpoint"
            ) from error
