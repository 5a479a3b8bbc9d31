"""The benchmarks' peak-memory helpers measure the child process itself, not the parent that spawned it."""

from __future__ import annotations

from pathlib import Path

from benchmarks.child import run_child

REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"])
from benchmarks.child import reset_peak_rss, vm_hwm_mb
rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
own_peak = vm_hwm_mb()
burst = b"\\x01" * (256 * 2**20)  # a transient peak before the reset
del burst
base = rss()
reset = reset_peak_rss()
block = b"\\x01" * (args["mb"] * 2**20)
print(json.dumps({"own_peak": own_peak, "extra": vm_hwm_mb() - base, "reset": reset}))
"""


def test_child_peak_is_its_own_and_reset_drops_the_earlier_burst():
    held = b"\x01" * (768 * 2**20)  # resident in the parent while the child runs
    result = run_child(CHILD, {"root": str(REPO_ROOT), "mb": 64})
    assert len(held) == 768 * 2**20
    # ru_maxrss would start at the parent's RSS (> 768 MiB) after the spawn; VmHWM is the child's own
    assert result["own_peak"] < 200
    assert result["reset"] is True
    # after the reset the peak is the 64 MiB block, not the 256 MiB burst before it
    assert 60 < result["extra"] < 120
