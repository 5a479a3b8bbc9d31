"""SMILE for Mistral / Llama / Qwen2-style causal LMs; importing registers the Auto classes."""

from fusion_bench_pave.smile.causal_lm.configuration import SmileLlamaConfig, SmileMistralConfig, SmileQwen2Config
from fusion_bench_pave.smile.causal_lm.modeling import (
    SmileLlamaForCausalLM,
    SmileMistralForCausalLM,
    SmileQwen2ForCausalLM,
)

__all__ = [
    "SmileLlamaConfig", "SmileLlamaForCausalLM", "SmileMistralConfig", "SmileMistralForCausalLM",
    "SmileQwen2Config", "SmileQwen2ForCausalLM",
]
