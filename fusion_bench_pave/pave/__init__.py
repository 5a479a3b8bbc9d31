"""PAVE: purifying task vectors in a knowledge-aware subspace (arXiv 2510.14697).

Pure math (torch only): covariance.py (streaming X^T X hooks over calibration batches),
regularize.py (C + eps I), purify.py (context SVD, projection U_r U_r^T W of one layer),
rank_allocation.py (spectral rank allocation), purification.py (a pool's {task: {layer: W}} ->
purified weights and ranks, layer by layer), regmean.py (RegMean of one layer from Gram matrices).
Around it: task_statistics.py (each task's statistics: cache, DDP shards, checks, or a statistics
directory), models.py (Linear weights of nn.Modules, compatibility checks, DARE), cache.py (on-disk
covariance cache of io/statistics.py task files), offload.py (statistics on disk or in memory),
calibration.py (train split -> model inputs), report.py, plot.py; the FusionBench classes `PAVE`
(algorithm.py), `PAVEStatistics` (statistics_algorithm.py: a pool's statistics written once to a
directory) and `RegMeanFromStatistics` (regmean_algorithm.py: RegMean from such a directory).

Usage: ``fusion_bench method=pave_ties modelpool=... taskpool=...`` (also pave_ta, pave_dare_ties,
pave_emr), or ``PAVE(merger={...}, rho=...).run(modelpool)``; ``fusion_bench method=pave_statistics
modelpool=... method.output_dir=DIR`` then ``method.statistics=DIR`` measures once, merges many.
"""

__all__ = ["PAVE", "PAVEStatistics", "RegMeanFromStatistics"]


def __getattr__(name: str):
    # The algorithm (FusionBench, Lightning, matplotlib) loads on first use of ``pave.PAVE``, so the
    # math modules of this package import with torch alone.
    if name == "PAVE":
        from fusion_bench_pave.pave.algorithm import PAVE

        return PAVE
    if name == "PAVEStatistics":
        from fusion_bench_pave.pave.statistics_algorithm import PAVEStatistics

        return PAVEStatistics
    if name == "RegMeanFromStatistics":
        from fusion_bench_pave.pave.regmean_algorithm import RegMeanFromStatistics

        return RegMeanFromStatistics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
