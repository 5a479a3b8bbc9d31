"""Plain SMILE vs knowledge-aware SMILE (PAVE-SMILE) at equal parameter counts over a (gate_k, k) grid.

Variants (``method=smile_upscaling`` keys): ``plain`` (subspace=plain, rank_allocation=uniform: SMILE),
``knowledge_aware`` / ``whitened`` (that subspace with rank_allocation=spectral: PAVE-SMILE), and the
ablations ``plain_spectral``, ``knowledge_aware_uniform``, ``whitened_uniform``. At the same k every
variant has exactly the same number of parameters. For every (variant, k) gate_k is chosen on validation and the chosen
model is evaluated once on test. Models are composed from the installed yaml and built as
``fusion_bench`` builds them (``benchmarks/reproduce.py``'s helpers).

Zoos: ``minilm`` (zoo_minilm / zoo_minilm_val) and ``tiny_clip`` (the tiny CLIP pool: it has no
validation split, so the first half of each test split validates and the second half tests).
Writes ``results.json``, ``results.md`` and ``accuracy_vs_params.png`` into ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/pave_smile.py --zoos tiny_clip minilm
    OMP_NUM_THREADS=1 python benchmarks/pave_smile.py --variants plain_spectral whitened_uniform  # add ablations
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce import ZOOS, Bench, compose, instantiate  # noqa: E402  (also sets HF offline)

VARIANTS = {
    "plain": ("plain", "uniform"),
    "knowledge_aware": ("knowledge_aware", "spectral"),
    "whitened": ("whitened", "spectral"),
    "plain_spectral": ("plain", "spectral"),
    "knowledge_aware_uniform": ("knowledge_aware", "uniform"),
    "whitened_uniform": ("whitened", "uniform"),
}
TINY_CLIP = {"modelpool": "tiny_clip", "test": "tiny_clip", "val": "tiny_clip"}
# default (gate_k, k) grids: the tiny CLIP layers are 32 wide
GRIDS = {"tiny_clip": {"gate_k": [1, 4], "k": [2, 4, 8]}, "minilm": {"gate_k": [2, 8], "k": [4, 16, 64]}}


class TinyClipBench(Bench):
    """The tiny CLIP pool: validation = first half of each test split, test = second half."""

    def __init__(self, cache_dir: Path) -> None:
        ZOOS.setdefault("tiny_clip", TINY_CLIP)
        super().__init__("tiny_clip", cache_dir, None, None)

    def taskpool(self, split: str, tasks: list[str] | None = None):
        if split not in self.taskpools:
            cfg = compose(["taskpool=tiny_clip"]).taskpool
            pool = instantiate(cfg)
            halves = {}
            for task, config in cfg.test_datasets.items():
                data = instantiate(config)
                half = len(data) // 2
                halves[task] = data.select(range(half) if split == "val" else range(half, len(data)))
            pool._test_datasets = halves  # read by the CLIP task pool's setup()
            self.taskpools[split] = pool
        return self.taskpools[split]


def accuracy(report: dict) -> float:
    return float(report["average"]["accuracy"])


def per_task(report: dict) -> dict[str, float]:
    return {t: float(r["accuracy"]) for t, r in report.items() if isinstance(r, dict) and "accuracy" in r and t != "average"}


def run_zoo(zoo: str, args: argparse.Namespace, record) -> list[dict]:
    from fusion_bench_pave.smile import SmileLinear
    from fusion_bench_pave.zoo import cache_root

    cache = cache_root()
    bench = TinyClipBench(cache) if zoo == "tiny_clip" else Bench(zoo, cache, args.val_rows, args.test_rows)
    calibration = [
        f"method.covariance.cache_dir={cache / 'pave_covariance'}",
        f"method.covariance.num_samples={args.num_samples if zoo != 'tiny_clip' else 64}",
        f"method.covariance.max_length={args.max_length}",
    ]
    rows = []
    for variant in args.variants:
        subspace, allocation = VARIANTS[variant]
        for k in args.k or GRIDS[zoo]["k"]:
            trials, best = [], None
            for gate_k in args.gate_k or GRIDS[zoo]["gate_k"]:
                overrides = [f"method.gate_k={gate_k}", f"method.k={k}", f"method.subspace={subspace}",
                             f"method.rank_allocation={allocation}", *calibration]
                model, _, seconds = bench.merge("smile_upscaling", overrides)
                smiles = [m for m in model.modules() if isinstance(m, SmileLinear)]
                trial = {
                    "gate_k": gate_k, "merge_seconds": seconds,
                    "params": sum(p.numel() for p in model.parameters()),
                    "expert_params": sum(m.expert_u.numel() + m.expert_svh.numel() for m in smiles),
                    "ranks": [m.k for m in smiles],  # per upscaled layer, in module order
                    "val_accuracy": accuracy(bench.evaluate(model, "val")),
                }
                logging.info(f"{zoo} {variant} k={k} gate_k={gate_k}: val {trial['val_accuracy']:.4f}, "
                             f"{trial['params'] / 1e6:.2f}M params, merge {seconds:.0f}s")
                trials.append(trial)
                if best is None or trial["val_accuracy"] > best[0]["val_accuracy"]:
                    best = (trial, model)
            trial, model = best
            test = bench.evaluate(model, "test")
            row = {"zoo": zoo, "variant": variant, "k": k, "chosen_gate_k": trial["gate_k"],
                   "val_accuracy": trial["val_accuracy"], "test_accuracy": accuracy(test), "test_per_task": per_task(test),
                   "params": trial["params"], "expert_params": trial["expert_params"], "ranks": trial["ranks"],
                   "merge_seconds": trial["merge_seconds"], "trials": trials}
            logging.info(f"{zoo} {variant} k={k}: chose gate_k={trial['gate_k']}, test {row['test_accuracy']:.4f}")
            rows.append(row)
            record(row)
    return rows


def markdown(result: dict) -> str:
    """Test accuracy at each parameter count, gate_k chosen on validation; then the validation grid."""
    lines = ["| zoo | variant | k | gate_k (val) | params (M) | expert params | val avg | test avg | merge s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['zoo']} | {r['variant']} | {r['k']} | {r['chosen_gate_k']} | {r['params'] / 1e6:.3f} | "
                     f"{r['expert_params']} | {100 * r['val_accuracy']:.1f} | **{100 * r['test_accuracy']:.1f}** | {r['merge_seconds']:.0f} |")
    gates = sorted({t["gate_k"] for r in result["rows"] for t in r["trials"]})
    lines += ["", "Validation accuracy over the grid (%):", "", "| zoo | variant | k | " + " | ".join(f"gate_k={g}" for g in gates) + " |",
              "|---|---|---|" + "---|" * len(gates)]
    for r in result["rows"]:
        val = {t["gate_k"]: t["val_accuracy"] for t in r["trials"]}
        lines.append(f"| {r['zoo']} | {r['variant']} | {r['k']} | " + " | ".join(f"{100 * val[g]:.1f}" if g in val else "" for g in gates) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """One panel per zoo: test accuracy against parameter count, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zoos = list(dict.fromkeys(r["zoo"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(zoos), figsize=(6 * len(zoos), 4.5), squeeze=False)
    for ax, zoo in zip(axes[0], zoos):
        for variant in VARIANTS:
            pts = sorted((r["params"] / 1e6, 100 * r["test_accuracy"], r["chosen_gate_k"]) for r in result["rows"] if r["zoo"] == zoo and r["variant"] == variant)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
            for x, y, g in pts:
                ax.annotate(f"g={g}", (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set(title=f"{zoo}: SMILE vs PAVE-SMILE (gate_k chosen on val)", xlabel="parameters (millions)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(result, indent=2)), ("results.md", markdown(result))):
        (out / f".{name}.tmp").write_text(text)
        (out / f".{name}.tmp").replace(out / name)
    plot(result, out / "accuracy_vs_params.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", nargs="+", choices=["tiny_clip", "minilm"], default=["tiny_clip", "minilm"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["plain", "knowledge_aware", "whitened"])
    parser.add_argument("--gate-k", type=int, nargs="+", default=None, help="default: GRIDS[zoo]")
    parser.add_argument("--k", type=int, nargs="+", default=None, help="default: GRIDS[zoo]")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration samples per task (tiny_clip: 64)")
    parser.add_argument("--max-length", type=int, default=64, help="calibration truncation (text)")
    parser.add_argument("--val-rows", type=int, default=40, help="first N validation rows per task (minilm)")
    parser.add_argument("--test-rows", type=int, default=150, help="first N test rows per task (minilm)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pave_smile"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    # rows of other (zoo, variant) pairs from earlier runs are kept, so ablations can be added later
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {"rows": [], "runs": []}
    keep = [r for r in previous["rows"] if not (r["zoo"] in args.zoos and r["variant"] in args.variants)]
    result: dict[str, Any] = {"runs": [*previous.get("runs", []), vars(args)], "rows": keep}
    start = time.perf_counter()

    def record(row: dict) -> None:
        result["rows"].append(row)
        result["seconds"] = time.perf_counter() - start
        write(result, out)

    for zoo in args.zoos:
        run_zoo(zoo, args, record)
    print(markdown(result))


if __name__ == "__main__":
    main()
