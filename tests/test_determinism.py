"""Determinism: the same config and seed give bit-identical merged weights in two separate processes
(whatever the ambient RNG state), for PAVE-TIES, PAVE-DARE-TIES (random drops) and SMILE; a
different DARE seed gives different weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fusion_bench.utils import instantiate

from conftest import compose_fusion_bench

TESTS = Path(__file__).resolve().parent
POOL = ["modelpool=tiny_clip"]
PAVE = ["method.num_samples=16", "method.batch_size=8", "method.cache_dir=null", "method.rho=0.75"]
METHODS = {
    "pave_ties": ["method=pave_ties", *PAVE],
    "pave_dare_ties": ["method=pave_dare_ties", *PAVE],
    "smile_upscaling": ["method=smile_upscaling", "method.gate_k=4", "method.k=8", "method.top_k=2"],
}


def weights_digest(model: nn.Module) -> str:
    """Hash of every tensor's name, dtype, shape and bytes: equal digests = bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merge(overrides: list[str]) -> nn.Module:
    """Run the method of ``overrides`` on the tiny CLIP pool as the program would (config -> instances)."""
    cfg = compose_fusion_bench([*overrides, *POOL])
    result = instantiate(cfg.method, _recursive_=False).run(instantiate(cfg.modelpool))
    return result["model"] if isinstance(result, dict) else result


CHILD = """
import json, random, sys, torch
torch.set_num_threads(1)
ambient = int(sys.argv[1])  # a different global RNG state per process: results must not depend on it
random.seed(ambient); torch.manual_seed(ambient); torch.rand(ambient + 1)
from test_determinism import METHODS, merge, weights_digest
print(json.dumps({name: weights_digest(merge(overrides)) for name, overrides in METHODS.items()}))
"""


def digests_in_a_new_process(ambient_seed: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ambient_seed)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_give_bit_identical_merged_weights():
    first, second = digests_in_a_new_process(0), digests_in_a_new_process(12345)
    assert set(first) == set(METHODS)
    assert first == second
    assert len(set(first.values())) == len(METHODS)  # three different models, not one trivial result


def test_dare_seed_changes_the_merge_and_the_same_seed_repeats_it():
    torch.set_num_threads(1)
    base = merge(METHODS["pave_dare_ties"])
    torch.manual_seed(999)  # ambient RNG moved on: the method's own seed decides
    again = merge(METHODS["pave_dare_ties"])
    other = merge([*METHODS["pave_dare_ties"], "method.seed=43"])
    assert weights_digest(again) == weights_digest(base)
    assert weights_digest(other) != weights_digest(base)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, other.state_dict()[k])]
    assert any(k.endswith("fc1.weight") for k in changed)
