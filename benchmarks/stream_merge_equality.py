"""Our streamed checkpoint merges vs FusionBench's in-memory merges on real weights: equality, time, memory.

For each method (Task Arithmetic, TIES-Merging, DARE-TIES) two fresh Python processes run one after
the other: the first merges the checkpoint directories with ``merge_causal_lm_checkpoints``
(``merging.stream``) into a temporary directory; the second loads the models, runs FusionBench's
``TaskArithmeticAlgorithm`` / ``TiesMergingAlgorithm`` / ``DareTiesMerging`` on them, then loads the
streamed checkpoint and compares every state-dict tensor (``torch.equal`` count, max abs difference).
Each process reports its wall seconds and its own peak RSS (VmHWM, read before the comparison), so
each side's memory is measured alone. The second process loads its models only for FusionBench, so
FusionBench's in-place edits touch nothing else (what deep copies are for elsewhere) and its peak
holds no copies. DARE draws from a generator seeded with ``--seed`` on our side and from torch's
global generator after ``torch.manual_seed(--seed)`` on FusionBench's. FusionBench's TIES and
DARE-TIES flatten every model into one vector (17 GB peak on the SmolLM2 zoo): they are skipped,
loudly, when MemAvailable is under ``--min-available-gb``.

Defaults: the SmolLM2 zoo (``python -m fusion_bench_pave.assets.install text llm``, built on first
use) with the README's settings: TA lambda 1.0; TIES lambda 0.6, threshold 20, merge_func sum,
remove_keys []; DARE-TIES lambda 0.6 with FusionBench's ``dare/ties_merging`` defaults (sparsity 0.5,
rescale, every parameter, threshold 20, sum).

    python -m benchmarks.stream_merge_equality [--pretrained DIR --finetuned DIR [DIR ...]]
        [--methods task_arithmetic ties_merging dare_ties_merging] [--out results.json]
Prints a Markdown table and writes JSON to --out
(default benchmarks/results/stream_merge_equality/results.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.child import print_table, run_child, vm_hwm_mb

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("task_arithmetic", "ties_merging", "dare_ties_merging")
FLATTENING = {"ties_merging", "dare_ties_merging"}  # FusionBench flattens every model into one vector
CHILD = (f"import json, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
         "from benchmarks.stream_merge_equality import child; print(json.dumps(child(json.loads(sys.argv[1]))))")


def smollm_zoo() -> tuple[Path, list[Path]]:
    """The SmolLM2 zoo's pretrained and fine-tuned directories under the cache root (not built here)."""
    from fusion_bench_pave.assets import ZOOS, cache_root
    from fusion_bench_pave.assets.smollm import RECIPE, TASKS

    zoo = cache_root() / f"{ZOOS['smollm'].directory}-v{RECIPE}"
    return zoo / "pretrained", [zoo / "models" / task for task in TASKS]


def method_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each method's parameters, named as FusionBench's constructors name them (plus DARE's seed)."""
    ties = {"threshold": args.threshold, "remove_keys": [], "merge_func": "sum"}
    return {
        "task_arithmetic": {"scaling_factor": args.ta_lambda},
        "ties_merging": {"scaling_factor": args.ties_lambda, **ties},
        "dare_ties_merging": {"scaling_factor": args.dare_lambda, **ties, "sparsity_ratio": args.dare_sparsity,
                              "only_on_linear_weights": False, "rescale": True, "seed": args.seed},
    }


def streamed_side(arguments: dict[str, Any]) -> dict[str, Any]:
    """Merge the checkpoints with ``merge_causal_lm_checkpoints`` into ``arguments["out"]``."""
    from fusion_bench_pave.merging.checkpoint_merge import merge_causal_lm_checkpoints
    from fusion_bench_pave.merging.stream import Dare, TaskArithmetic, Ties

    method, s = arguments["method"], arguments["settings"]
    merge = (TaskArithmetic(s["scaling_factor"]) if method == "task_arithmetic"
             else Ties(s["scaling_factor"], s["threshold"], s["merge_func"]))
    dare = Dare(s["sparsity_ratio"], s["rescale"], s["only_on_linear_weights"], s["seed"]) if method == "dare_ties_merging" else None
    start = time.perf_counter()
    merge_causal_lm_checkpoints(arguments["pretrained"], arguments["finetuned"], arguments["out"], merge, dare=dare, progress=False)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": vm_hwm_mb()}


def fusion_bench_side(arguments: dict[str, Any]) -> dict[str, Any]:
    """Load the models, merge them with FusionBench's algorithm, then compare with the streamed checkpoint."""
    import torch
    from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
    from fusion_bench.method.dare import DareTiesMerging
    from fusion_bench.modelpool import BaseModelPool
    from transformers import AutoModelForCausalLM

    method, s = arguments["method"], dict(arguments["settings"])
    start = time.perf_counter()
    models = {"_pretrained_": AutoModelForCausalLM.from_pretrained(arguments["pretrained"], dtype="auto")}
    models |= {f"task{i}": AutoModelForCausalLM.from_pretrained(path, dtype="auto") for i, path in enumerate(arguments["finetuned"])}
    load_seconds = time.perf_counter() - start
    seed = s.pop("seed", None)
    algorithm = {"task_arithmetic": TaskArithmeticAlgorithm, "ties_merging": TiesMergingAlgorithm,
                 "dare_ties_merging": DareTiesMerging}[method](**s)
    start = time.perf_counter()
    if seed is not None:
        torch.manual_seed(seed)  # FusionBench's DARE draws from the global generator
    merged = algorithm.run(BaseModelPool(models))
    row = {"load_seconds": load_seconds, "seconds": time.perf_counter() - start, "peak_rss_mb": vm_hwm_mb()}
    del models
    streamed = AutoModelForCausalLM.from_pretrained(arguments["streamed"], dtype="auto")
    return row | compare(streamed.state_dict(), merged.state_dict())


def compare(got: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """How many of ``want``'s tensors ``got`` holds bit for bit, the max abs difference, the names that differ."""
    import torch

    missing = sorted(want.keys() - got.keys()) + sorted(got.keys() - want.keys())
    common = [name for name in want if name in got]
    diffs = {}
    for name in common:
        if got[name].shape != want[name].shape:
            diffs[name] = float("inf")
        elif not torch.equal(got[name], want[name]):
            diffs[name] = (got[name].double() - want[name].double()).abs().max().item()
    return {"tensors": len(want), "equal": len(common) - len(diffs), "max_abs_diff": max(diffs.values(), default=0.0),
            "unequal": sorted(diffs)[:10], "key_mismatch": missing[:10], "all_equal": not missing and not diffs}


def child(arguments: dict[str, Any]) -> dict[str, Any]:
    """Entry point of the fresh child processes (``CHILD``)."""
    return streamed_side(arguments) if arguments["side"] == "streamed" else fusion_bench_side(arguments)


def mem_available_gb() -> float:
    """MemAvailable from /proc/meminfo, in GB."""
    return next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable:")) / 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, default=None, help="pretrained checkpoint directory (default: the SmolLM2 zoo's)")
    parser.add_argument("--finetuned", type=Path, nargs="+", default=None, help="fine-tuned checkpoint directories")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--ta-lambda", type=float, default=1.0)
    parser.add_argument("--ties-lambda", type=float, default=0.6)
    parser.add_argument("--dare-lambda", type=float, default=0.6)
    parser.add_argument("--threshold", type=float, default=20, help="TIES / DARE-TIES: percentage of each task's entries kept")
    parser.add_argument("--dare-sparsity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="DARE's seed (both sides)")
    parser.add_argument("--min-available-gb", type=float, default=12.0,
                        help="skip FusionBench's TIES / DARE-TIES when MemAvailable is below this")
    parser.add_argument("--tmp", default=None, help="directory for the streamed checkpoints (one at a time)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stream_merge_equality" / "results.json")
    args = parser.parse_args(argv)
    if (args.pretrained is None) != (args.finetuned is None):
        parser.error("give both --pretrained and --finetuned, or neither (the SmolLM2 zoo)")
    zoo = args.pretrained is None
    if zoo:
        args.pretrained, args.finetuned = smollm_zoo()
    for path in [args.pretrained, *args.finetuned]:
        if not (path / "config.json").is_file():
            parser.error(f"{path}: not a checkpoint directory (no config.json)" + (
                "; the SmolLM2 zoo needs `python -m fusion_bench_pave.assets.install text llm` and a first use "
                "(e.g. the README's zoo_smollm run) to build it" if zoo else ""))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every chosen method on both sides, print the table, write the JSON and return it."""
    args = parse_args(argv)
    settings = method_settings(args)
    paths = {"pretrained": str(args.pretrained), "finetuned": [str(path) for path in args.finetuned]}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for method in args.methods:
            out = Path(tmp) / method
            common = {"method": method, "settings": settings[method], **paths}
            row: dict[str, Any] = {"method": method, "settings": settings[method],
                                   "streamed": run_child(CHILD, {"side": "streamed", "out": str(out), **common})}
            if method in FLATTENING and (available := mem_available_gb()) < args.min_available_gb:
                message = (f"SKIPPED FusionBench's {method}: MemAvailable {available:.1f} GB < {args.min_available_gb} GB "
                           "(it flattens every model into one vector; run it with more free memory)")
                print(f"\n*** {message} ***\n", file=sys.stderr, flush=True)
                row["fusion_bench"] = {"skipped": message}
            else:
                row["fusion_bench"] = run_child(CHILD, {"side": "fusion_bench", "streamed": str(out), **common})
            shutil.rmtree(out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"args": vars(args) | paths | {"out": str(args.out)}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table([table_row(row) for row in rows])
    print(f"wrote {args.out}")
    return result


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row of the Markdown table."""
    ours, theirs = row["streamed"], row["fusion_bench"]
    ran = "equal" in theirs
    return {"method": row["method"], "tensors equal": f"{theirs['equal']}/{theirs['tensors']}" if ran else "skipped",
            "max abs diff": theirs["max_abs_diff"] if ran else "", "streamed s": f"{ours['seconds']:.1f}",
            "streamed peak MB": round(ours["peak_rss_mb"]), "FusionBench load s": f"{theirs['load_seconds']:.1f}" if ran else "",
            "FusionBench merge s": f"{theirs['seconds']:.1f}" if ran else "",
            "FusionBench peak MB": round(theirs["peak_rss_mb"]) if ran else ""}

if __name__ == "__main__":
    main()
