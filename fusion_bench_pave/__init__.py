"""PAVE task-vector purification and SMILE upscaling for FusionBench."""

from fusion_bench_pave.compat import patch_transformers_for_fusion_bench

patch_transformers_for_fusion_bench()

__version__ = "0.1.0"
