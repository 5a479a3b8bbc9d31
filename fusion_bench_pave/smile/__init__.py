"""SMILE: zero-shot sparse mixture of low-rank experts built from fine-tuned models (arXiv 2408.10174)."""

from fusion_bench_pave.smile.linear import SmileLinear
from fusion_bench_pave.smile.upscale import UpscaleReport, upscale_model

__all__ = ["SmileLinear", "UpscaleReport", "upscale_model"]
