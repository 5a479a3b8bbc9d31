"""PAVE: purifying task vectors in a knowledge-aware subspace (arXiv 2510.14697).

Pure math (torch only):  covariance.py (streaming X^T X hooks), regularize.py (C + eps I),
purify.py (context SVD, projection U_r U_r^T W), rank_allocation.py (spectral rank allocation),
cache.py (on-disk covariance cache of statistics files, io/statistics.py), offload.py (statistics in
memory or on disk until purification). FusionBench
glue: calibration.py (train split -> model inputs), algorithm.py (the `PAVE` algorithm), plot.py
(rank heatmap).

Usage: ``fusion_bench method=pave_ties modelpool=... taskpool=...`` (also pave_ta, pave_dare_ties,
pave_emr), or ``PAVE(merger={...}, rho=...).run(modelpool)``.
"""

__all__ = ["PAVE"]


def __getattr__(name: str):
    # The algorithm (FusionBench, Lightning, matplotlib) loads on first use of ``pave.PAVE``, so the
    # math modules of this package import with torch alone.
    if name == "PAVE":
        from fusion_bench_pave.pave.algorithm import PAVE

        return PAVE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
