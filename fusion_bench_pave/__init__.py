"""PAVE task-vector purification and SMILE upscaling for FusionBench."""

from fusion_bench_pave.compat import patch_transformers_for_fusion_bench
from fusion_bench_pave.resolvers import register_resolvers

patch_transformers_for_fusion_bench()
register_resolvers()

# Registers Smile{Mistral,Llama,Qwen2}ForCausalLM with transformers' Auto classes, so any process
# that imported the plugin (every fusion_bench run) can from_pretrained a saved SMILE model.
from fusion_bench_pave.smile import causal_lm  # noqa: E402,F401

__version__ = "0.1.0"
