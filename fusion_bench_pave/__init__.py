"""PAVE task-vector purification and SMILE upscaling for FusionBench.

Importing the package changes nothing in the process; ``fusion_bench_pave.plugin`` holds the side
effects (compat repair, resolvers, Auto-class registration) that the FusionBench-facing modules need.
"""

__version__ = "0.1.0"
