"""Helpers shared by the benchmarks: a measurement in a fresh interpreter, its peak memory, a table."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(script: str, arguments: dict) -> dict:
    """Run ``script`` in a fresh Python with ``arguments`` as JSON in argv[1]; the JSON of its last
    output line (RuntimeError with its stderr if it fails)."""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(arguments)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM) in MiB: this process image's own, unlike ru_maxrss,
    which after fork/vfork + exec starts from the parent's RSS (a child of a parent holding 3 GiB
    reports a 3 GiB ru_maxrss)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0: /proc/self/clear_refs), so that `vm_hwm_mb`
    then reads the peak of what runs afterwards; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def print_table(rows: list[dict]) -> None:
    """The rows as a Markdown table (columns of the first row; per-repeat times left out)."""
    keys = [k for k in rows[0] if k != "times_ms"]
    print(" | ".join(keys))
    print(" | ".join("---" for _ in keys))
    for row in rows:
        print(" | ".join(f"{row.get(k, ''):.1e}" if isinstance(row.get(k), float) and abs(row[k]) < 1e-2 else str(row.get(k, "")) for k in keys))
