"""SMILE for Mistral / Llama / Qwen2 / Gemma2 / Phi3 causal LMs; importing registers the Auto classes."""

from fusion_bench_pave.smile.causal_lm.configuration import (
    SmileGemma2Config,
    SmileLlamaConfig,
    SmileMistralConfig,
    SmilePhi3Config,
    SmileQwen2Config,
)
from fusion_bench_pave.smile.causal_lm.modeling import (
    SmileGemma2ForCausalLM,
    SmileLlamaForCausalLM,
    SmileMistralForCausalLM,
    SmilePhi3ForCausalLM,
    SmileQwen2ForCausalLM,
)

__all__ = [
    "SmileGemma2Config", "SmileGemma2ForCausalLM", "SmileLlamaConfig", "SmileLlamaForCausalLM",
    "SmileMistralConfig", "SmileMistralForCausalLM", "SmilePhi3Config", "SmilePhi3ForCausalLM",
    "SmileQwen2Config", "SmileQwen2ForCausalLM",
]
