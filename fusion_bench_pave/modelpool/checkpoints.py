"""Where a pool entry's weights are on disk, for the methods that stream checkpoints instead of loading models."""

from __future__ import annotations

import logging
from pathlib import Path

from fusion_bench.modelpool import BaseModelPool
from huggingface_hub import snapshot_download

log = logging.getLogger(__name__)


def safetensors_checkpoint_dir(modelpool: BaseModelPool, name: str) -> Path | None:
    """Local directory with the pool entry's safetensors weights, or None if it has none.

    A hub id is resolved to its snapshot in the Hugging Face cache (downloading weights, configs
    and tokenizer files if needed, as ``from_pretrained`` would), so hub models stream too.
    """
    try:
        path = modelpool.get_model_path(name)
    except (ValueError, RuntimeError, KeyError):
        return None
    if not isinstance(path, (str, Path)):
        return None
    if not Path(path).is_dir():
        try:
            path = snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"])
        except Exception as error:  # not a hub id, offline without a cached copy, gated, ...
            log.warning("cannot resolve %s (%s) to a safetensors checkpoint: %s", name, path, error)
            return None
    return Path(path) if any(Path(path).glob("*.safetensors")) else None
