"""FusionBench's open_clip pool, able to load the task-vectors checkpoints on current torch."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from fusion_bench.modelpool import OpenCLIPVisionModelPool as FusionBenchOpenCLIPPool
from fusion_bench.modelpool.openclip_vision.modelpool import _check_and_redirect_open_clip_modeling
from fusion_bench.models.open_clip import ImageEncoder


class OpenCLIPVisionModelPool(FusionBenchOpenCLIPPool):
    """``OpenCLIPVisionModelPool`` whose pickled checkpoints (a path, or {model_name, pickle_path}:
    the task-vectors paper's zeroshot.pt / finetuned.pt, whole pickled ImageEncoders) load with
    torch.load(weights_only=False). FusionBench 0.2.33 tries weights_only=True and falls back only on
    RuntimeError, but torch >= 2.6 raises pickle.UnpicklingError there, so every such checkpoint
    failed to load. They are trusted files the user downloaded, as the task-vectors code assumes."""

    def load_model(self, model_name_or_config: str | DictConfig, *args: Any, **kwargs: Any) -> ImageEncoder:
        config = model_name_or_config
        if isinstance(config, str) and config in self._models:
            config = self._models[config]
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        pickled = isinstance(config, Mapping) and set(config) == {"model_name", "pickle_path"}
        if not (isinstance(config, str) or pickled):
            return super().load_model(model_name_or_config, *args, **kwargs)
        _check_and_redirect_open_clip_modeling()  # the pickles name the task-vectors code's modules
        encoder = torch.load(config["pickle_path"] if pickled else config, weights_only=False)
        if pickled:  # as FusionBench: the weights into a freshly built encoder of that name
            fresh = ImageEncoder(config["model_name"])
            fresh.load_state_dict(encoder.state_dict())
            encoder = fresh
        return encoder
