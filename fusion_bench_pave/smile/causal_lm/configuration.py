"""Configs of SMILE causal LMs: the base architecture's config plus the four SMILE fields.

Field names match FusionBench's ``SmileMistralConfig`` (``num_experts_per_tok``,
``rank_of_router``, ``rank_of_expert``, ``num_local_experts``); ``rank_of_expert <= 0`` means
dense experts.
"""

from __future__ import annotations

import dataclasses

from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.configuration_utils import strict


@dataclasses.dataclass(repr=False)
class SmileFields:
    """The SMILE fields every SMILE config adds to its base config (a dataclass, so the
    transformers 5 config machinery validates, serialises and defaults them like its own)."""

    num_experts_per_tok: int = 1
    rank_of_router: int = 8
    rank_of_expert: int = 512
    num_local_experts: int = 1


@strict
class SmileMistralConfig(MistralConfig, SmileFields):
    model_type = "smile_mistral"
    base_model_tp_plan = {}  # SmileLinear has no tensor-parallel plan


@strict
class SmileLlamaConfig(LlamaConfig, SmileFields):
    model_type = "smile_llama"
    base_model_tp_plan = {}


@strict
class SmileQwen2Config(Qwen2Config, SmileFields):
    model_type = "smile_qwen2"
    base_model_tp_plan = {}


# base model_type -> SMILE config class
SMILE_CONFIGS: dict[str, type] = {"mistral": SmileMistralConfig, "llama": SmileLlamaConfig, "qwen2": SmileQwen2Config}
