"""SMILE: zero-shot sparse mixture of low-rank experts built from fine-tuned models (arXiv 2408.10174).

- ``linear.SmileLinear``: pretrained linear + router + T stacked low-rank (or dense) experts;
  ``linear.smile_layout``: the keys and shapes of one such layer, which every other place uses.
- ``svd.top_svd``: leading singular triplets (randomized when faster, full-SVD fallback).
- ``decompose.smile_tensors``: one layer's SMILE tensors from W0 and the fine-tuned W_i.
- ``upscale.upscale_model``: any model (CLIP, T5, ...) -> every changed nn.Linear becomes SmileLinear.
- ``record``: the settings and input fingerprints stored with a saved model, checked before reuse.
- ``causal_lm``: Smile{Mistral,Llama,Qwen2,Gemma2,Phi3}ForCausalLM (registered with the Auto classes on import)
  and the streaming safetensors upscaler.
- ``algorithm``: the FusionBench classes behind ``method=smile_upscaling`` and
  ``method=smile_mistral_upscaling``.

Saving and reloading SMILE models: fusion_bench_pave.io.smile.
"""

from fusion_bench_pave.smile.linear import SmileLinear
from fusion_bench_pave.smile.upscale import UpscaleReport, upscale_model

__all__ = ["SmileLinear", "UpscaleReport", "upscale_model"]
