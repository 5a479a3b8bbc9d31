"""PAVE: purifying task vectors in a knowledge-aware subspace (arXiv 2510.14697)."""

from fusion_bench_pave.pave.algorithm import PAVE

__all__ = ["PAVE"]
