"""SMILE causal LMs: transformers' Mistral / Llama / Qwen2 / Gemma2 / Phi3 models with ``SmileLinear`` projections.

Every decoder layer's attention and MLP projections (``SMILE_PROJECTIONS`` of the family) become
``SmileLinear`` modules (with zero router/experts until loaded), so every layer — including ones
whose fine-tuned copies did not change — has the same parameters and a checkpoint reloads without
missing keys. Phi3's fused ``qkv_proj`` and ``gate_up_proj`` are upscaled as the single Linears
they are: one router and one set of experts over the stacked [q; k; v] (or [gate; up]) change,
the same map as the fused layer (splitting them would route q, k and v separately, a different
model). Attention, RoPE, caching and generation are the installed transformers' own. Importing
this module registers the classes with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    Gemma2ForCausalLM,
    Gemma2Model,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    Phi3ForCausalLM,
    Phi3Model,
    Qwen2ForCausalLM,
    Qwen2Model,
)

from fusion_bench_pave.smile.causal_lm.configuration import (
    SmileGemma2Config,
    SmileLlamaConfig,
    SmileMistralConfig,
    SmilePhi3Config,
    SmileQwen2Config,
)
from fusion_bench_pave.smile.linear import SmileLinear
from fusion_bench_pave.smile.upscale import set_module

_SEPARATE = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
# base model_type -> projections upscaled in every decoder layer, relative to ``layers.<i>``
SMILE_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "mistral": _SEPARATE, "llama": _SEPARATE, "qwen2": _SEPARATE, "gemma2": _SEPARATE,
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}


def projection_pattern(projections: Sequence[str], suffix: str = "") -> re.Pattern:
    """Full-match pattern of the names ``[<prefix>.]layers.<i>.<projection><suffix>``."""
    alternatives = "|".join(re.escape(p) for p in projections)
    return re.compile(rf"(?:.*\.)?layers\.\d+\.(?:{alternatives}){re.escape(suffix)}")


def decoder_key(name: str) -> str:
    """``layers.<i>.<projection>``: a projection's name below the decoder stack (the key of
    ``config.layer_ranks``, the same in ``*Model`` and ``*ForCausalLM``)."""
    return name[re.search(r"(?:^|\.)layers\.\d+\.", name).start():].lstrip(".")


def install_smile_linears(model: nn.Module, config) -> None:
    """Replace every decoder projection of ``model`` by a ``SmileLinear`` of the same shape and the
    projection's ranks (``config.projection_ranks``)."""
    pattern = projection_pattern(SMILE_PROJECTIONS[config.model_type.removeprefix("smile_")])
    for name, old in [(n, m) for n, m in model.named_modules() if pattern.fullmatch(n)]:
        gate_k, k = config.projection_ranks(decoder_key(name))
        set_module(model, name, SmileLinear(
            old.in_features, old.out_features,
            num_experts=config.num_local_experts, gate_k=gate_k, k=k,
            top_k=config.num_experts_per_tok, bias=old.bias is not None,
            device=old.weight.device, dtype=old.weight.dtype,
        ))


class WithSmileLinears:
    """Mixin for a transformers model class: build the base model, then install the SmileLinears."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        install_smile_linears(self, config)


def smile_class(base: type, config_class: type) -> type:
    """``Smile<base>``: the transformers class ``base`` with SmileLinear projections, for ``config_class``."""
    return type(f"Smile{base.__name__}", (WithSmileLinears, base), {"config_class": config_class, "__module__": __name__})


SmileMistralModel = smile_class(MistralModel, SmileMistralConfig)
SmileMistralForCausalLM = smile_class(MistralForCausalLM, SmileMistralConfig)
SmileLlamaModel = smile_class(LlamaModel, SmileLlamaConfig)
SmileLlamaForCausalLM = smile_class(LlamaForCausalLM, SmileLlamaConfig)
SmileQwen2Model = smile_class(Qwen2Model, SmileQwen2Config)
SmileQwen2ForCausalLM = smile_class(Qwen2ForCausalLM, SmileQwen2Config)
SmileGemma2Model = smile_class(Gemma2Model, SmileGemma2Config)
SmileGemma2ForCausalLM = smile_class(Gemma2ForCausalLM, SmileGemma2Config)
SmilePhi3Model = smile_class(Phi3Model, SmilePhi3Config)
SmilePhi3ForCausalLM = smile_class(Phi3ForCausalLM, SmilePhi3Config)

_CLASSES = (
    (SmileMistralModel, SmileMistralForCausalLM), (SmileLlamaModel, SmileLlamaForCausalLM),
    (SmileQwen2Model, SmileQwen2ForCausalLM), (SmileGemma2Model, SmileGemma2ForCausalLM),
    (SmilePhi3Model, SmilePhi3ForCausalLM),
)
# base model_type -> SMILE causal LM class
SMILE_CAUSAL_LMS: dict[str, type] = {lm.config_class.model_type.removeprefix("smile_"): lm for _, lm in _CLASSES}

for _base, _lm in _CLASSES:
    AutoConfig.register(_lm.config_class.model_type, _lm.config_class, exist_ok=True)
    AutoModel.register(_lm.config_class, _base, exist_ok=True)
    AutoModelForCausalLM.register(_lm.config_class, _lm, exist_ok=True)
