"""SMILE causal LMs: transformers' Mistral / Llama / Qwen2 models with ``SmileLinear`` projections.

Every decoder layer's q/k/v/o and gate/up/down projections become ``SmileLinear`` modules (with
zero router/experts until loaded), so every layer — including ones whose fine-tuned copies did not
change — has the same parameters and a checkpoint reloads without missing keys. Attention, RoPE,
caching and generation are the installed transformers' own. Importing this module registers the
classes with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    Qwen2ForCausalLM,
    Qwen2Model,
)
from torch import nn

from fusion_bench_pave.smile.causal_lm.configuration import SmileLlamaConfig, SmileMistralConfig, SmileQwen2Config
from fusion_bench_pave.smile.linear import SmileLinear

# projections upscaled in every decoder layer, relative to ``model.layers.<i>``
SMILE_PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def install_smile_linears(layers: nn.ModuleList, config) -> None:
    """Replace the ``SMILE_PROJECTIONS`` of every decoder layer by a ``SmileLinear`` of the same shape."""
    for layer in layers:
        for path in SMILE_PROJECTIONS:
            parent_name, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            old: nn.Linear = getattr(parent, child)
            setattr(parent, child, SmileLinear(
                old.in_features, old.out_features,
                num_experts=config.num_local_experts, gate_k=config.rank_of_router, k=config.rank_of_expert,
                top_k=config.num_experts_per_tok, bias=old.bias is not None,
                device=old.weight.device, dtype=old.weight.dtype,
            ))


class SmileMistralModel(MistralModel):
    config_class = SmileMistralConfig

    def __init__(self, config: SmileMistralConfig) -> None:
        super().__init__(config)
        install_smile_linears(self.layers, config)


class SmileMistralForCausalLM(MistralForCausalLM):
    config_class = SmileMistralConfig

    def __init__(self, config: SmileMistralConfig) -> None:
        super().__init__(config)
        install_smile_linears(self.model.layers, config)


class SmileLlamaModel(LlamaModel):
    config_class = SmileLlamaConfig

    def __init__(self, config: SmileLlamaConfig) -> None:
        super().__init__(config)
        install_smile_linears(self.layers, config)


class SmileLlamaForCausalLM(LlamaForCausalLM):
    config_class = SmileLlamaConfig

    def __init__(self, config: SmileLlamaConfig) -> None:
        super().__init__(config)
        install_smile_linears(self.model.layers, config)


class SmileQwen2Model(Qwen2Model):
    config_class = SmileQwen2Config

    def __init__(self, config: SmileQwen2Config) -> None:
        super().__init__(config)
        install_smile_linears(self.layers, config)


class SmileQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = SmileQwen2Config

    def __init__(self, config: SmileQwen2Config) -> None:
        super().__init__(config)
        install_smile_linears(self.model.layers, config)


# base model_type -> SMILE causal LM class
SMILE_CAUSAL_LMS: dict[str, type] = {
    "mistral": SmileMistralForCausalLM, "llama": SmileLlamaForCausalLM, "qwen2": SmileQwen2ForCausalLM,
}

for _config, _base, _lm in (
    (SmileMistralConfig, SmileMistralModel, SmileMistralForCausalLM),
    (SmileLlamaConfig, SmileLlamaModel, SmileLlamaForCausalLM),
    (SmileQwen2Config, SmileQwen2Model, SmileQwen2ForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _base, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)
