"""Configs of SMILE causal LMs: the base architecture's config plus the four SMILE fields.

Field names match FusionBench's ``SmileMistralConfig`` (``num_experts_per_tok``,
``rank_of_router``, ``rank_of_expert``, ``num_local_experts``); ``rank_of_expert <= 0`` means
dense experts.
"""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.configuration_utils import strict


@strict
class SmileMistralConfig(MistralConfig):
    model_type = "smile_mistral"
    base_model_tp_plan = {}  # SmileLinear has no tensor-parallel plan
    num_experts_per_tok: int = 1
    rank_of_router: int = 8
    rank_of_expert: int = 512
    num_local_experts: int = 1


@strict
class SmileLlamaConfig(LlamaConfig):
    model_type = "smile_llama"
    base_model_tp_plan = {}
    num_experts_per_tok: int = 1
    rank_of_router: int = 8
    rank_of_expert: int = 512
    num_local_experts: int = 1


@strict
class SmileQwen2Config(Qwen2Config):
    model_type = "smile_qwen2"
    base_model_tp_plan = {}
    num_experts_per_tok: int = 1
    rank_of_router: int = 8
    rank_of_expert: int = 512
    num_local_experts: int = 1


# base model_type -> SMILE config class
SMILE_CONFIGS: dict[str, type] = {"mistral": SmileMistralConfig, "llama": SmileLlamaConfig, "qwen2": SmileQwen2Config}
