"""PAVE peak memory and purification time with covariance_offload=memory vs disk.

A CLIPVisionModel at ViT-B/32 widths (d 768, MLP 3072, 12 layers, random weights) and T seeded
fine-tuned copies, each task with N seeded token rows (reference/pave_comparison.py's builders). Each run is a fresh
subprocess (peak RSS = its VmHWM) doing what PAVE.run does between loading and merging:
collect each task's statistics, hand them to CovarianceOffload(mode), then purification.purify (written back in place, as PAVE.run does). Runs
alternate memory/disk per repeat so machine load hits both alike. Each run also reports a content
hash of all purified weights and of the kept ranks, which must agree between the modes.

    python -m benchmarks.perf_pave_memory [--tasks 4] [--layers 12] [--rows 1024] [--repeats 2]
Writes JSON to --out (default benchmarks/results/perf_pave_memory.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.child import vm_hwm_mb
from benchmarks.perf_pave import REPO_ROOT, SETTINGS
from fusion_bench_pave.pave.models import LinearWeights
from fusion_bench_pave.pave.purification import PurifySettings, purify
from fusion_bench_pave.io.fingerprint import fingerprint_state_dict
from fusion_bench_pave.pave.covariance import collect_covariance
from fusion_bench_pave.pave.offload import CovarianceOffload, stats_bytes
from reference.pave_comparison import build

MODES = ("memory", "disk")


def child(args: dict) -> dict:
    """Build, collect, offload, purify; report times, peak RSS and a hash of the purified weights."""
    import psutil

    torch.set_num_threads(args["threads"])
    setting = args["setting"]
    _, finetuned, batches = build(setting)
    base_mb = psutil.Process().memory_info().rss / 2**20
    settings = PurifySettings(rho=args["rho"], allocation=args["allocation"], eps0=setting["eps0"])
    start = time.perf_counter()
    with CovarianceOffload(args["mode"], len(finetuned)) as offload:
        stats = {}
        for task, model in finetuned.items():
            collected = collect_covariance(model, ((b, None) for b in batches[task]), max_rows=setting["rows"])
            task_mb = stats_bytes(collected) / 2**20
            stats[task] = offload.keep(collected)
            del collected
        collection_s = time.perf_counter() - start
        collection_peak_mb = vm_hwm_mb()
        held_mb = psutil.Process().memory_info().rss / 2**20
        start = time.perf_counter()
        weights = {task: LinearWeights(model) for task, model in finetuned.items()}
        _, ranks, _ = purify(weights, stats, settings, write=lambda t, layer, w: weights[t].write(layer, w))
        purification_s = time.perf_counter() - start
        on_disk = offload.on_disk
    weights = {f"{t}/{l}": m.get_submodule(l).weight for t, m in finetuned.items() for l in ranks[t]}
    return {
        "mode": args["mode"], "on_disk": on_disk, "allocation": args["allocation"],
        "collection_s": collection_s, "purification_s": purification_s,
        "base_rss_mb": base_mb, "rss_before_purification_mb": held_mb,
        "peak_rss_collection_mb": collection_peak_mb, "peak_rss_mb": vm_hwm_mb(),
        "stats_per_task_mb": task_mb, "weights_hash": fingerprint_state_dict(weights),
        "ranks_hash": hashlib.sha256(json.dumps(ranks, sort_keys=True).encode()).hexdigest()[:16],
    }


def spawn(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf_pave_memory", "--child", json.dumps(args)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{args['mode']} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], allocation: str) -> dict:
    by_mode = {m: [r for r in runs if r["mode"] == m and r["allocation"] == allocation] for m in MODES}
    row = {"allocation": allocation}
    for mode, rs in by_mode.items():
        row[f"{mode}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        row[f"{mode}_rss_before_purification_mb"] = max(r["rss_before_purification_mb"] for r in rs)
        row[f"{mode}_base_rss_mb"] = min(r["base_rss_mb"] for r in rs)
        row[f"{mode}_purification_s"] = statistics.median(r["purification_s"] for r in rs)
        row[f"{mode}_collection_s"] = statistics.median(r["collection_s"] for r in rs)
    row["purification_time_ratio_disk_over_memory"] = row["disk_purification_s"] / row["memory_purification_s"]
    row["ratio_per_repeat"] = [d["purification_s"] / m["purification_s"] for m, d in zip(by_mode["memory"], by_mode["disk"])]
    row["weights_identical"] = len({r["weights_hash"] for rs in by_mode.values() for r in rs}) == 1
    row["ranks_identical"] = len({r["ranks_hash"] for rs in by_mode.values() for r in rs}) == 1
    return row


def table(rows: list[dict]) -> str:
    head = ("allocation", "mode", "peak RSS MB", "RSS before purification MB", "purification s", "disk/memory time",
            "weights identical")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for row in rows:
        for mode in MODES:
            lines.append(" | ".join([
                row["allocation"], mode, f"{row[f'{mode}_peak_rss_mb']:.0f}",
                f"{row[f'{mode}_rss_before_purification_mb']:.0f}", f"{row[f'{mode}_purification_s']:.1f}",
                f"{row['purification_time_ratio_disk_over_memory']:.2f}" if mode == "disk" else "",
                str(row["weights_identical"]) if mode == "disk" else "",
            ]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--rho", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--allocations", nargs="+", default=["per_layer", "per_model"], choices=["per_layer", "per_model"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "perf_pave_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    setting = SETTINGS["vit_b32"] | {"layers": args.layers, "tasks": args.tasks, "rows": args.rows}
    runs = []
    for allocation in args.allocations:
        for repeat in range(args.repeats):
            order = MODES if repeat % 2 == 0 else MODES[::-1]
            for mode in order:
                print(f"[{allocation}] repeat {repeat + 1}/{args.repeats}: {mode} ...", flush=True)
                runs.append(spawn({"mode": mode, "allocation": allocation, "setting": setting, "rho": args.rho,
                                   "threads": args.threads}))
                print(json.dumps(runs[-1]), flush=True)
    rows = [summarize(runs, allocation) for allocation in args.allocations]
    print(table(rows))
    out = {"setting": setting, "rho": args.rho, "threads": args.threads, "torch": torch.__version__,
           "load_avg_1m_at_end": os.getloadavg()[0], "rows": rows, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
