"""The SmolLM2 zoo's PAVE rows under the official LLM protocol (rho 4089/4096, uniform allocation,
eps0 0.01, eps_tol 1e-2), in-memory (``method=pave_ta``) and streamed (``method=pave_causal_lm``),
evaluated on the README table's test rows (the first 100 per task, as ``reproduce.py --test-rows 100``).

    # in-memory: Task Arithmetic alone and PAVE + TA; the PAVE + TA weights go to --weights for the comparison
    python -m benchmarks.smollm_llm_protocol inmemory --out benchmarks/results/smollm_llm_protocol
    # streamed checkpoints written by the CLI (benchmarks/results/smollm_llm_protocol/run.sh runs every step),
    # then evaluated and compared
    python -m benchmarks.smollm_llm_protocol streamed --out benchmarks/results/smollm_llm_protocol \
        --checkpoint "PAVE + Task Arithmetic (streamed)=/tmp/streamed_pave_ta" ...

Each step adds its rows (test accuracy per task, merge seconds, kept ranks, weight equality) to
``<out>/rows.json``; results.md in benchmarks/results/smollm_llm_protocol/ reports them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.reproduce import OFFICIAL_PROTOCOLS, OFFICIAL_RHO, Bench, compose, instantiate
from benchmarks.stream_merge_equality import compare as compare_state_dicts

# the official LLM purification (reproduce.py --official llm), with calibration on this zoo's short prompts:
# 64 prompts per task, at most 96 tokens (every prompt fits), as the README's earlier SmolLM2 rows, so only
# the protocol changes
LLM_PROTOCOL = [f"method.rho={OFFICIAL_RHO['llm']}", *OFFICIAL_PROTOCOLS["llm"], "method.num_samples=64",
                "method.max_length=96"]
TEST_ROWS = 100


def add_rows(out: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``<out>/rows.json`` (replacing rows of the same name)."""
    path = out / "rows.json"
    old = json.loads(path.read_text()) if path.exists() else []
    names = {row["name"] for row in rows}
    path.write_text(json.dumps([r for r in old if r["name"] not in names] + rows, indent=2))


def row(name: str, method: str, overrides: list[str], report: dict, seconds: float | None, **extra) -> dict:
    tasks = [k for k, v in report.items() if isinstance(v, dict) and "accuracy" in v and k != "average"]
    return {"name": name, "method": method, "overrides": overrides, "merge_seconds": seconds,
            "test": {t: report[t]["accuracy"] for t in tasks}, "average": report["average"]["accuracy"], **extra}


def inmemory(bench: Bench, out: Path, weights: Path) -> None:
    """Task Arithmetic (lambda 1.0) alone and in-memory PAVE + TA under the LLM protocol; the PAVE + TA
    state dict goes to ``weights`` (outside the repository: 0.5 GB) for the ``streamed`` comparison."""
    rows = []
    model, _, seconds = bench.merge("task_arithmetic", ["method.scaling_factor=1.0"])
    rows.append(row("Task Arithmetic", "task_arithmetic", ["method.scaling_factor=1.0"],
                    bench.evaluate(model, "test"), seconds))
    del model
    # composed here, not by Bench.merge, which points PAVE at the shared covariance cache: computed afresh
    overrides = ["method.merger.scaling_factor=1.0", *LLM_PROTOCOL, "method.cache_dir=null"]
    cfg = compose(["method=pave_ta", "modelpool=zoo_smollm", *overrides])
    modelpool, algorithm = instantiate(cfg.modelpool), instantiate(cfg.method)
    start = time.perf_counter()
    result = algorithm.run(modelpool)
    seconds = time.perf_counter() - start
    model, extras = result["model"], result
    torch.save(model.state_dict(), weights)
    kept = extras.get("pave", {}).get("kept_ratio")
    rows.append(row("PAVE + Task Arithmetic (in-memory)", "pave_ta", overrides, bench.evaluate(model, "test"),
                    seconds, kept_ratio=kept))
    add_rows(out, rows)


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def streamed(bench: Bench, out: Path, weights: Path, checkpoints: list[str], compare: str | None) -> None:
    """Evaluate merged checkpoints written by the streamed CLI; ``compare`` names the one whose weights
    are compared with the saved in-memory PAVE + TA."""
    rows = []
    for spec in checkpoints:
        name, path = spec.split("=", 1)
        model = load(Path(path))
        extra = {"checkpoint": path}
        if name == compare:
            reference = torch.load(weights)
            extra["equality_with_inmemory"] = compare_state_dicts(model.state_dict(), reference)
        rows.append(row(name, "pave_causal_lm", [], bench.evaluate(model, "test"), None, **extra))
    add_rows(out, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["inmemory", "streamed"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/smollm_llm_protocol"))
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "smollm_inmemory_pave_ta.pt",
                        help="where inmemory saves the PAVE + TA state dict that streamed compares with")
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="NAME=PATH")
    parser.add_argument("--compare", default=None, help="checkpoint NAME compared with the in-memory PAVE + TA")
    args = parser.parse_args(argv)
    from fusion_bench_pave.assets import cache_root

    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench("smollm", cache_root(), None, TEST_ROWS)
    start = time.perf_counter()
    if args.step == "inmemory":
        inmemory(bench, args.out, args.weights)
    else:
        streamed(bench, args.out, args.weights, args.checkpoint, args.compare)
    print(f"{args.step}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
