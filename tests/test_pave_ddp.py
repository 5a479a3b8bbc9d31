"""PAVE covariance collection under Lightning Fabric DDP (2 CPU processes, gloo) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import child_pythonpath
from pave_helpers import make_pool

from fusion_bench_pave.pave import PAVE

SETTINGS = dict(rho=0.8, num_samples=14, batch_size=3, eps0=0.01)
MERGER = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from lightning import Fabric
    from pave_helpers import make_pool
    from fusion_bench_pave.pave import PAVE

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    algo = PAVE(merger={merger!r}, **{settings!r})
    algo.fabric = fabric
    pool = make_pool("t5")
    stats = algo.task_covariance(pool, "task0", pool.load_model("task0"))
    result = algo.run(make_pool("t5"))
    if fabric.global_rank == 0:
        torch.save(
            {{"xtx": stats.xtx, "count": stats.count, "merged": result["model"].state_dict(),
              "ranks": algo.extras["ranks"], "world": fabric.world_size}},
            sys.argv[1],
        )
    """
)


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_single_process(tmp_path):
    script = tmp_path / "pave_ddp.py"
    script.write_text(SCRIPT.format(merger=MERGER, settings=SETTINGS))
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2

    algo = PAVE(merger=MERGER, **SETTINGS)
    pool = make_pool("t5")
    single = algo.task_covariance(pool, "task0", pool.load_model("task0"))
    assert ddp["count"] == single.count
    assert ddp["xtx"].keys() == single.xtx.keys()
    for key, value in single.xtx.items():
        torch.testing.assert_close(ddp["xtx"][key], value, rtol=1e-9, atol=1e-9)

    result = algo.run(make_pool("t5"))
    assert ddp["ranks"] == algo.extras["ranks"]
    for key, value in result["model"].state_dict().items():
        torch.testing.assert_close(ddp["merged"][key], value, rtol=1e-6, atol=1e-6)


CACHED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from lightning import Fabric
    from pave_helpers import make_pool
    from fusion_bench_pave.pave import PAVE

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    hits = []
    for _ in range(2):
        algo = PAVE(merger={merger!r}, cache_dir=sys.argv[1], **{settings!r})
        algo.fabric = fabric
        hits.append(algo.run(make_pool("t5"))["pave"]["covariance_cache_hits"])
    Path(sys.argv[2], f"hits{{fabric.global_rank}}.json").write_text(json.dumps(hits))
    fabric.barrier()  # rank 0 (the launcher) must not exit before rank 1 has written
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["directory", "file"])
def test_ddp_ranks_agree_on_the_cache(tmp_path, cache):
    """Rank 0 checks cache_dir and tells the others: a directory is written once and hit by every
    rank on the next run; a file disables the cache on every rank (no rank waits for the other)."""
    script = tmp_path / "pave_ddp_cache.py"
    script.write_text(CACHED_SCRIPT.format(merger=MERGER, settings=SETTINGS))
    cache_dir = tmp_path / "cache"
    if cache == "file":
        cache_dir.write_text("not a directory")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), str(cache_dir), str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [0, 3] if cache == "directory" else [0, 0]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"hits{rank}.json").read_text()) == expected, rank
    if cache == "directory":
        assert len(list(cache_dir.glob("pave_cov_v3_*.safetensors"))) == 3
