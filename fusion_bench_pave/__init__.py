"""PAVE task-vector purification and SMILE upscaling for FusionBench."""

from fusion_bench_pave.compat import patch_transformers_for_fusion_bench
from fusion_bench_pave.resolvers import register_resolvers

patch_transformers_for_fusion_bench()
register_resolvers()

__version__ = "0.1.0"
