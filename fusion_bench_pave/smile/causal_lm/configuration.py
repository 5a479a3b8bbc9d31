"""Configs of SMILE causal LMs: the base architecture's config plus the SMILE fields.

Field names match FusionBench's ``SmileMistralConfig`` / ``SmileGemma2Config``
(``num_experts_per_tok``, ``rank_of_router``, ``rank_of_expert``, ``num_local_experts``) and so
do the model types (``smile_<base model_type>``); ``rank_of_expert <= 0`` means dense experts.
``layer_ranks`` (ours) lists the projections whose (router, expert) ranks differ from the model-wide
ones, clamped to their full rank (``decompose.layer_ranks``); configs without it (saved before it
existed, when every projection had the model-wide ranks) load as before.
"""

from __future__ import annotations

import dataclasses

from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config
from transformers.configuration_utils import strict


@dataclasses.dataclass(repr=False)
class SmileFields:
    """The SMILE fields every SMILE config adds to its base config (a dataclass, so the
    transformers 5 config machinery validates, serialises and defaults them like its own)."""

    num_experts_per_tok: int = 1
    rank_of_router: int = 8
    rank_of_expert: int = 512
    num_local_experts: int = 1
    # "layers.<i>.<projection>" -> [rank_of_router, rank_of_expert] of that projection, where they differ
    layer_ranks: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def projection_ranks(self, key: str) -> tuple[int, int]:
        """(gate_k, k) of the projection ``layers.<i>.<projection>``."""
        return tuple(self.layer_ranks.get(key, (self.rank_of_router, self.rank_of_expert)))


def smile_config(base: type) -> type:
    """``Smile<base>``: the transformers config class ``base`` plus the SMILE fields, model type
    ``smile_<base model type>`` and no tensor-parallel plan (SmileLinear has none)."""
    namespace = {"model_type": f"smile_{base.model_type}", "base_model_tp_plan": {}, "__module__": __name__}
    return strict(type(f"Smile{base.__name__}", (base, SmileFields), namespace))


SmileMistralConfig = smile_config(MistralConfig)
SmileLlamaConfig = smile_config(LlamaConfig)
SmileQwen2Config = smile_config(Qwen2Config)
SmileGemma2Config = smile_config(Gemma2Config)
SmilePhi3Config = smile_config(Phi3Config)

# base model_type -> SMILE config class
SMILE_CONFIGS: dict[str, type] = {
    c.model_type.removeprefix("smile_"): c
    for c in (SmileMistralConfig, SmileLlamaConfig, SmileQwen2Config, SmileGemma2Config, SmilePhi3Config)
}
