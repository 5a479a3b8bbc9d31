"""The math and I/O layers load with torch (and safetensors) alone: importing them pulls in none of
FusionBench, Hydra/OmegaConf, Lightning, matplotlib, transformers or datasets (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MATH_MODULES = [
    "fusion_bench_pave.pave.covariance", "fusion_bench_pave.pave.heads", "fusion_bench_pave.pave.regularize",
    "fusion_bench_pave.pave.purify", "fusion_bench_pave.pave.rank_allocation", "fusion_bench_pave.pave.offload",
    "fusion_bench_pave.smile.svd", "fusion_bench_pave.smile.decompose", "fusion_bench_pave.smile.linear",
    "fusion_bench_pave.smile.upscale", "fusion_bench_pave.pave.purification", "fusion_bench_pave.tensor_checks",
    "fusion_bench_pave.io.atomic", "fusion_bench_pave.io.safetensors",
    "fusion_bench_pave.io.statistics", "fusion_bench_pave.io.fingerprint", "fusion_bench_pave.io.smile",
    "fusion_bench_pave.smile.upscale", "fusion_bench_pave.merging.task_arithmetic", "fusion_bench_pave.merging.ties",
    "fusion_bench_pave.merging.dare", "fusion_bench_pave.merging.kth_magnitude", "fusion_bench_pave.merging.stream", "fusion_bench_pave.linear_layers",
]
HEAVY = ["fusion_bench", "omegaconf", "hydra", "lightning", "matplotlib", "transformers", "datasets"]


def loaded_after_import(module: str) -> list[str]:
    code = f"import sys, {module}; print(' '.join(h for h in {HEAVY!r} if h in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


@pytest.mark.parametrize("module", MATH_MODULES)
def test_math_module_imports_with_torch_alone(module):
    assert loaded_after_import(module) == []


def test_the_check_sees_heavy_imports():
    # the FusionBench-facing algorithm does load them: the probe is not blind
    assert {"fusion_bench", "omegaconf", "lightning"} <= set(loaded_after_import("fusion_bench_pave.pave.algorithm"))
