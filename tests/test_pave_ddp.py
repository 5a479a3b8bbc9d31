"""PAVE covariance collection under Lightning Fabric DDP (2 CPU processes, gloo) equals one process."""

from __future__ import annotations

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
