"""PAVE against the physical floor of its own work, each ratio measured side by side in one process.

Per shape setting (benchmarks.perf_pave's random models at MiniLM, ViT-B/32 and Mistral-7B-layer
widths, T perturbed copies, N seeded calibration rows per task; `minilm_zoo`: the real MiniLM zoo,
all six layers, its first T fine-tuned models on N rows of their own training text), every repeat
times, interleaved:
- forward: a plain no-grad forward of each fine-tuned model over its calibration batches;
- statistics: the same forwards with our covariance hooks (accumulate_dtype float64, and float32);
- floor products: W C_eps and the Gram product of the decomposition (M M^T or M^T M, M = W C_eps),
  float64 GEMMs, for every (task, layer);
- the official eps rule's own cost: the float32 explicit inverses it takes for every (task,
  distinct input) until eps (one each when eps0 passes), which any procedure with its eps pays;
- purification: purification.purify (rho 0.9, per_model, doubling eps: the official procedure's
  settings) on the float64 statistics, the same with regularization=relative (no float32
  inverse), for information, and with pave_ties' settings (rho 63/64, per_layer, doubling eps),
  where only the trailing columns of U past the floor rank are formed.
Ratios are medians over repeats of the per-repeat ratios. Accuracy (first repeat): every purified
weight against the exact reference, the float64 SVD of W C_eps (the same C_eps) followed by
U_r U_r^T W (max relative Frobenius over layers and tasks), for float64 and float32 statistics (the
reference always from the float64 ones); ranks against the official rank search
(reference/official_pave.py, float32). Peak RSS of statistics collection per accumulate dtype comes
from one child process each (its VmHWM, reset after building the models, over the RSS then).

The `e2e_minilm` setting runs method=pave_ties (PAVE + TIES, the pave_ties.yaml settings) from a
cold covariance cache on an in-memory MiniLM-shaped pool (random 6-layer BERT at 384/1536, T
perturbed copies, word-level tokenizer, texts of 64-128 words) against its calibration forwards
plus TIES alone on the same pool.

    python -m benchmarks.perf_pave_floor [--quick] [--repeats 3] [--settings minilm vit_b32 mistral_layer minilm_zoo e2e_minilm]
Prints a table and writes JSON to --out (default benchmarks/results/perf_pave_floor.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from benchmarks.child import reset_peak_rss, vm_hwm_mb
from benchmarks.perf_pave import QUICK, SETTINGS, build, write_results
from fusion_bench_pave.pave.covariance import CovarianceStats, collect_covariance
from fusion_bench_pave.pave.models import LinearWeights
from fusion_bench_pave.pave.purification import PurifySettings, RegularizedCovariances, purify
from fusion_bench_pave.pave.regularize import add_identity
from fusion_bench_pave.pave.task_statistics import CollectionSettings
from reference import pave_comparison
from reference.official_pave import rank_search
from reference.pave_comparison import max_error_vs_exact

REPO_ROOT = Path(__file__).resolve().parent.parent
FLOOR_SETTINGS = ("minilm", "vit_b32", "mistral_layer", "minilm_zoo")
E2E = dict(layers=6, hidden=384, ffn=1536, heads=12, tasks=3, num_samples=64, words=(64, 128))
E2E_QUICK = dict(layers=2, tasks=2, num_samples=32)
TARGETS = {"statistics": 1.25, "purification": 2.0, "end_to_end": 1.5}
PAVE_TIES_YAML = REPO_ROOT / "fusion_bench_pave" / "config" / "method" / "pave_ties.yaml"
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def forward_all(models: dict, batches: dict) -> None:
    for task, model in models.items():
        for inputs in batches[task]:
            model(**inputs)


def collect_all(models: dict, batches: dict, setting: dict, dtype: torch.dtype) -> dict[str, CovarianceStats]:
    includes = CollectionSettings(exclude=tuple(pave_comparison.excluded(setting))).includes
    return {task: collect_covariance(model, ((b, None) for b in batches[task]), includes, dtype, setting["rows"])
            for task, model in models.items()}


@torch.no_grad()
def floor_products(weights: dict[str, LinearWeights], stats: dict[str, CovarianceStats]) -> None:
    """The products purification cannot avoid: M = W C (float64) and its smaller Gram matrix."""
    for task, linears in weights.items():
        for layer in stats[task].layers:
            product = linears[layer].to(torch.float64) @ stats[task].xtx[stats[task].input_of[layer]]
            _ = product @ product.T if product.shape[0] <= product.shape[1] else product.T @ product


def rule_inverses(stats: dict[str, CovarianceStats], cov_eps: RegularizedCovariances) -> list[torch.Tensor]:
    """The float32 matrices the official doubling rule inverts: C + eps0 2^k I, k = 0 .. the doublings
    that reached each (task, distinct input)'s eps (from `cov_eps`; the inverses are what is timed)."""
    matrices = []
    for task, task_stats in stats.items():
        layer_of = {key: layer for layer, key in task_stats.input_of.items()}
        for layer in layer_of.values():
            eps, cov = cov_eps.settings.eps0, task_stats.covariance(layer)
            while eps <= cov_eps.eps_of(task, layer):
                matrices.append(add_identity(cov, eps).float())
                eps *= 2.0
    return matrices


def official_ranks(finetuned: dict, batches: dict, setting: dict, settings: PurifySettings, full: dict) -> dict:
    ratios = rank_search(finetuned, batches, settings.rho, setting["rows"], setting["eps0"],
                         exclude=tuple(pave_comparison.excluded(setting)))
    return {t: {layer: max(1, round(r * ratios[t])) for layer, r in full.items()} for t in finetuned}


def bench_floor(name: str, setting: dict, repeats: int, threads: int) -> dict:
    """Statistics vs forward and purification vs floor products, interleaved per repeat."""
    _, finetuned, batches = build(setting)
    weights = {t: LinearWeights(m) for t, m in finetuned.items()}
    doubling = PurifySettings(rho=pave_comparison.RHO, allocation="per_model", eps0=setting["eps0"])
    relative = PurifySettings(rho=pave_comparison.RHO, allocation="per_model", regularization="relative")
    pave_ties = PurifySettings(rho=float(OmegaConf.load(PAVE_TIES_YAML).rho), allocation="per_layer",
                               eps0=setting["eps0"])
    times: dict[str, list[float]] = {k: [] for k in ("forward", "stats_f64", "stats_f32", "floor", "purify",
                                                      "purify_relative", "purify_pave_ties", "rule_inverses")}
    for rep in range(repeats):
        print(f"[{name}] repeat {rep + 1}/{repeats}", flush=True)
        times["forward"].append(seconds(lambda: forward_all(finetuned, batches))[0])
        t64, stats64 = seconds(lambda: collect_all(finetuned, batches, setting, torch.float64))
        t32, stats32 = seconds(lambda: collect_all(finetuned, batches, setting, torch.float32))
        times["stats_f64"].append(t64)
        times["stats_f32"].append(t32)
        times["floor"].append(seconds(lambda: floor_products(weights, stats64))[0])
        cov_eps = RegularizedCovariances(stats64, doubling)  # eps of each input, for pave_ties' settings too
        matrices = rule_inverses(stats64, cov_eps)
        times["rule_inverses"].append(seconds(lambda: [torch.linalg.inv(m) for m in matrices])[0])
        matrices = None
        tp, (purified, ranks, full) = seconds(lambda: purify(weights, stats64, doubling))
        times["purify"].append(tp)
        times["purify_relative"].append(seconds(lambda: purify(weights, stats64, relative))[0])
        tt, (purified_ties, ranks_ties, _) = seconds(lambda: purify(weights, stats64, pave_ties))
        times["purify_pave_ties"].append(tt)
        if rep == 0:
            error_ties = max_error_vs_exact(purified_ties, ranks_ties, weights, cov_eps)
            error64 = max_error_vs_exact(purified, ranks, weights, cov_eps)
            purified32, ranks32, _ = purify(weights, stats32, doubling)
            error32 = max_error_vs_exact(purified32, ranks32, weights, cov_eps) if ranks32 == ranks else float("inf")
            ranks_equal = ranks == official_ranks(finetuned, batches, setting, doubling, full)
        stats64 = stats32 = purified = purified_ties = cov_eps = None  # free the sums before the next repeat
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    memory = {dtype: spawn_memory_child(setting, dtype, threads) for dtype in DTYPES}
    return {
        "setting": name, "config": setting, "times": times,
        "stats_vs_forward": ratio("stats_f64", "forward"), "stats_f32_vs_forward": ratio("stats_f32", "forward"),
        "purify_vs_floor": ratio("purify", "floor"), "purify_relative_vs_floor": ratio("purify_relative", "floor"),
        "purify_pave_ties_vs_floor": ratio("purify_pave_ties", "floor"),
        "rule_inverses_vs_floor": ratio("rule_inverses", "floor"), "max_rel_err_vs_exact_pave_ties": error_ties,
        "max_rel_err_vs_exact": error64, "max_rel_err_vs_exact_f32_stats": error32,
        "ranks_f32_stats_equal": ranks32 == ranks, "ranks_equal_official": ranks_equal,
        "stats_peak_rss_extra_mb": memory,
    }


# ----------------------------------------------------------------------------- memory child
def memory_child(args: dict) -> dict:
    """Extra peak RSS of collecting every task's statistics (kept together, as a PAVE run keeps them)."""
    import psutil

    _, finetuned, batches = build(args["setting"])
    base = psutil.Process().memory_info().rss / 2**20
    reset = reset_peak_rss()  # else the peak may be the build's
    stats = collect_all(finetuned, batches, args["setting"], DTYPES[args["dtype"]])
    sums = sum(x.numel() * x.element_size() for s in stats.values() for x in s.xtx.values())
    return {"extra_mb": vm_hwm_mb() - base, "sums_mb": sums / 2**20, "peak_reset": reset}


def spawn_memory_child(setting: dict, dtype: str, threads: int) -> dict:
    payload = json.dumps({"setting": setting, "dtype": dtype})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf_pave_floor", "--memory-child", payload],
                          capture_output=True, text=True, env=thread_env(threads), cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def thread_env(threads: int) -> dict:
    return os.environ | {var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


# ----------------------------------------------------------------------------- end to end
def e2e_pool(config: dict) -> Any:
    """A MiniLM-shaped in-memory pool: pretrained + T perturbed copies, word tokenizer, long texts."""
    import numpy as np
    from datasets import Dataset

    from reference import tiny_models
    from tests.pave_helpers import CalibrationPool

    base = tiny_models.bert(0, pooler=False, hidden_size=config["hidden"], intermediate_size=config["ffn"],
                            num_attention_heads=config["heads"], num_hidden_layers=config["layers"],
                            max_position_embeddings=512, vocab_size=len(tiny_models.WORDS) + 4)
    names = [f"task{i}" for i in range(config["tasks"])]
    low, high = config["words"]

    def texts(seed: int) -> Dataset:
        rng = np.random.default_rng(seed)
        rows = [" ".join(rng.choice(tiny_models.WORDS, size=int(rng.integers(low, high)))) for _ in range(256)]
        return Dataset.from_dict({"text": rows, "label": [0] * len(rows)})

    models = {"_pretrained_": base, **{n: tiny_models.perturbed(base, 100 + i) for i, n in enumerate(names)}}
    return CalibrationPool(models, {n: texts(200 + i) for i, n in enumerate(names)}, tiny_models.tokenizer(), "text")


def bench_e2e(config: dict, repeats: int) -> dict:
    """PAVE + TIES (cold cache) vs calibration forwards + TIES alone, interleaved per repeat."""
    from fusion_bench.method import TiesMergingAlgorithm
    from fusion_bench_pave.pave import PAVE
    from fusion_bench_pave.pave.calibration import iter_batches, sample_indices

    yaml = OmegaConf.load(PAVE_TIES_YAML)
    ties = {k: v for k, v in OmegaConf.to_container(yaml.merger).items() if k != "_target_"}
    times: dict[str, list[float]] = {"pave_ties": [], "forwards": [], "ties": []}
    for rep in range(repeats):
        print(f"[e2e_minilm] repeat {rep + 1}/{repeats}", flush=True)
        pool = e2e_pool(config)
        tokenizer = pool.load_tokenizer()

        @torch.no_grad()
        def forwards() -> None:
            for task in pool.model_names:
                model, data = pool.load_model(task), pool.load_train_dataset(task)
                indices = sample_indices(len(data), config["num_samples"], 42, task)
                for inputs, _ in iter_batches(data, indices, tokenizer, model, task):
                    model(**inputs)

        times["forwards"].append(seconds(forwards)[0])
        times["ties"].append(seconds(lambda: TiesMergingAlgorithm(**ties).run(e2e_pool(config)))[0])
        with tempfile.TemporaryDirectory() as cache:
            pave = PAVE(merger=OmegaConf.to_container(yaml.merger), rho=float(yaml.rho), cache_dir=cache,
                        num_samples=config["num_samples"])
            times["pave_ties"].append(seconds(lambda: pave.run(e2e_pool(config)))[0])
    pool_build = seconds(lambda: e2e_pool(config))[0]  # inside the PAVE and TIES timings, not the forwards'
    ratios = [(p - pool_build) / (f + t - pool_build) for p, f, t in zip(times["pave_ties"], times["forwards"], times["ties"])]
    return {"setting": "e2e_minilm", "config": config, "times": times, "pool_build_s": pool_build,
            "end_to_end_vs_forwards_plus_ties": statistics.median(ratios)}


# ----------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    head = ("setting", "stats/forward f64 (f32)", "purify/floor (relative eps; pave_ties)", "rule inverses/floor",
            "max rel dW vs exact f64 (f32 stats; pave_ties)",
            "ranks = official", "stats extra peak MB f64 / f32 (sums MB)")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "end_to_end_vs_forwards_plus_ties" in r:
            lines.append(f"e2e_minilm: pave_ties / (forwards + TIES) = {r['end_to_end_vs_forwards_plus_ties']:.2f}x "
                         f"(target <= {TARGETS['end_to_end']}x)")
            continue
        m = r["stats_peak_rss_extra_mb"]
        lines.append(" | ".join([
            r["setting"], f"{r['stats_vs_forward']:.2f}x ({r['stats_f32_vs_forward']:.2f}x)",
            f"{r['purify_vs_floor']:.2f}x ({r['purify_relative_vs_floor']:.2f}x; {r['purify_pave_ties_vs_floor']:.2f}x)",
            f"{r['rule_inverses_vs_floor']:.2f}x",
            f"{r['max_rel_err_vs_exact']:.1e} ({r['max_rel_err_vs_exact_f32_stats']:.1e}; "
            f"{r['max_rel_err_vs_exact_pave_ties']:.1e})", str(r["ranks_equal_official"]),
            f"{m['float64']['extra_mb']:.0f} / {m['float32']['extra_mb']:.0f} "
            f"({m['float64']['sums_mb']:.0f} / {m['float32']['sums_mb']:.0f})",
        ]))
    lines.append(f"targets: statistics <= {TARGETS['statistics']}x, purification <= {TARGETS['purification']}x, "
                 f"accuracy <= 1e-6")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small MiniLM/ViT and e2e settings only")
    parser.add_argument("--settings", nargs="+", default=[*FLOOR_SETTINGS, "e2e_minilm"],
                        choices=[*FLOOR_SETTINGS, "e2e_minilm"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "perf_pave_floor.json"))
    args = parser.parse_args()
    if args.memory_child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    if os.environ.get("OMP_NUM_THREADS") != str(args.threads):  # every BLAS pool gets `threads`: start again
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.perf_pave_floor", *sys.argv[1:]],
                  thread_env(args.threads))
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.settings:
        if name == "e2e_minilm":
            rows.append(bench_e2e(E2E | (E2E_QUICK if args.quick else {}), args.repeats))
        elif not args.quick or name in QUICK:
            setting = SETTINGS[name] | (QUICK.get(name, {}) if args.quick else {})
            rows.append(bench_floor(name, setting, args.repeats, args.threads))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("config", "times")}), flush=True)
    print(table(rows))
    write_results(args.out, rows, quick=args.quick, threads=args.threads, targets=TARGETS)


if __name__ == "__main__":
    main()
