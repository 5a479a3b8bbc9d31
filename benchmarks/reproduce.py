"""Measure pretrained, individual, simple average, TA, TIES, DARE-TIES and EMR, each with and
without PAVE, and SMILE over a (gate_k, k) grid, on a real offline zoo; or, with ``--paper``, run a
paper's presets and write its table with the paper's figures beside ours (benchmarks/paper_tables.py).

Every model is built the way ``fusion_bench`` builds it: the configs are composed from the
installed yaml (``method=... modelpool=zoo_<zoo> taskpool=zoo_<zoo>``) and instantiated, then
``method.run(modelpool)`` and ``taskpool.evaluate(model)``, as FusionBench's program does.
Hyperparameters (lambda, rho) are chosen on the validation task pool; each chosen model is then
evaluated once on the test task pool. Writes ``results.json``, ``results.md`` and
``accuracy_vs_params.png`` into ``--out``.

    python -m fusion_bench_pave.assets.install text
    python -m benchmarks.reproduce --zoo minilm --out benchmarks/results/minilm
    python -m fusion_bench_pave.assets.install text llm   # the SmolLM2-as-Mistral causal-LM zoo
    python -m benchmarks.reproduce --zoo smollm --only task_arithmetic smile_mistral_upscaling \
        emr_merging/emr_merging simple_average --gate-k 4 --k 16 64 --num-samples 64 --max-length 96 \
        --val-rows 40 --test-rows 100   # FusionBench's TIES needs > 14 GB for its 135M models
    python -m benchmarks.reproduce --paper pave \
        --set roberta-base_glue:modelpool.finetuned_prefix=/data/roberta-glue/   # needs the hub
    python -m benchmarks.reproduce --paper pave --replica   # the same presets on tiny offline replicas
    python -m benchmarks.reproduce --paper smile --replica  # every SMILE preset, likewise
    # the GLUE-protocol zoo over its fine-tuning seeds, PAVE under the official protocol at the paper's rho
    python -m benchmarks.reproduce --zoo minilm_glue_s0 minilm_glue_s1 minilm_glue_s2 --official \
        --only task_arithmetic ties_merging dare/ties_merging emr_merging/emr_merging --out benchmarks/results/minilm_glue
    # the SmolLM2 zoo under the official LLM protocol, rho chosen on validation
    python -m benchmarks.reproduce --zoo smollm --official llm --rhos 0.998291015625 0.995 0.984375 0.96875 \
        --only task_arithmetic emr_merging/emr_merging --num-samples 64 --max-length 96 --val-rows 40 --test-rows 100
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.paper_tables import PAPERS, reproduce_paper
from benchmarks.report import seed_summary, seed_table, write_outputs

# zoo -> its modelpool / test / val yaml and its SMILE method with that method's (gate_k, k) keys
SMILE_UPSCALING = {"method": "smile_upscaling", "gate_k": "method.gate_k", "k": "method.k"}
SMILE_MISTRAL = {"method": "smile_mistral_upscaling", "gate_k": "method.rank_of_router", "k": "method.rank_of_expert"}
ZOOS = {
    "minilm": {"modelpool": "zoo_minilm", "test": "zoo_minilm", "val": "zoo_minilm_val", "smile": SMILE_UPSCALING},
    "smollm": {"modelpool": "zoo_smollm", "test": "zoo_smollm", "val": "zoo_smollm_val", "smile": SMILE_MISTRAL},
    "clip": {"modelpool": "zoo_clip", "test": "zoo_clip", "val": "zoo_clip_val", "smile": SMILE_UPSCALING},
    # the GLUE-protocol zoo, one per fine-tuning seed: bodies merged, each task scored with its own head.
    # PAVE leaves BERT's pooler unpurified: it reads one row per text (the CLS token), too few for the
    # official 4096-row protocol, and it is the first layer of BERT's head (RoBERTa keeps that dense
    # layer inside its head, which the paper never purifies)
    **{f"minilm_glue_s{seed}": {"modelpool": f"zoo_minilm_glue_s{seed}", "test": "zoo_minilm_glue",
                                "val": "zoo_minilm_glue_val", "smile": SMILE_UPSCALING,
                                "pave": ["method.exclude_modules=[pooler.dense]"]} for seed in range(3)},
}
# PAVE as the official code runs it (design/PAVE.md), chosen by --official:
# glue: the method yaml's paper rho, one kept ratio per model, the first 4096 token rows of the train split,
#   padding to the batch's longest text, padding tokens included in the covariance;
# llm (config/method/pave_causal_lm.yaml): rho 4089/4096 unless --rhos, one kept ratio for every layer, eps
#   doubled from 0.01 to a 1e-2 inverse residual. Its calibration stays the run's own (--num-samples,
#   --max-length, padding left out): one text padded to 512 tokens would be mostly padding for prompts of
#   60-70 tokens
OFFICIAL_PROTOCOLS = {
    "glue": ["method.allocation=per_model", "method.num_rows=4096", "method.calibration_padding=longest",
             "method.mask_padding=false"],
    "llm": ["method.allocation=uniform", "method.eps0=0.01", "method.eps_tol=0.01", "method.regularization=doubling",
            "method.floor_factor=1.5", "method.num_rows=null", "method.batch_size=16",
            "method.calibration_padding=longest", "method.mask_padding=true", "method.sample_order=random",
            "method.seed=42", "method.calibration_split=train"],
}
OFFICIAL_RHO = {"glue": None, "llm": 0.998291015625}  # None: the method yaml's paper rho

# (row name, fusion_bench method, PAVE counterpart or None, tuned merger keys)
# in order of priority: a run cut short still has the most informative rows
BASELINES = [
    ("TIES-Merging", "ties_merging", "pave_ties", True),
    ("Task Arithmetic", "task_arithmetic", "pave_ta", True),
    ("SMILE", "smile", None, False),  # the zoo's SMILE method over its (gate_k, k) grid: every point is reported
    ("EMR-Merging", "emr_merging/emr_merging", "pave_emr", False),
    ("DARE-TIES", "dare/ties_merging", "pave_dare_ties", True),
    ("Simple average", "simple_average", None, False),
]


def compose(overrides: list[str]):
    """FusionBench's main config composed as its CLI composes it (our plugin on the search path)."""
    import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fusion_bench.utils.hydra_utils import get_default_config_path

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=get_default_config_path(), version_base=None):
        return hydra_compose("fabric_model_fusion", overrides=overrides)


def instantiate(config):
    """Instantiate a pool/method config as FusionBench's program does (non-recursive by default)."""
    from fusion_bench.utils import instantiate as fb_instantiate

    return fb_instantiate(config, _recursive_=config.get("_recursive_", False))


class Bench:
    """Builds models and task pools of one zoo from the installed yaml."""

    def __init__(self, zoo: str, cache_dir: Path, val_rows: int | None, test_rows: int | None):
        """``cache_dir``: where PAVE's covariance cache lives (shared by all runs)."""
        names = ZOOS[zoo]
        self.names, self.cache_dir = names, cache_dir
        self.rows = {"val": val_rows, "test": test_rows}
        self.taskpools: dict[str, Any] = {}

    def taskpool(self, split: str, tasks: list[str] | None = None):
        """The val/test task pool, optionally restricted to some tasks and to the first N rows."""
        key = (split, tuple(tasks or ()))
        if key not in self.taskpools:
            # composed with the model pool: a task pool may read its zoo or tokenizer (${modelpool.zoo})
            cfg = compose([f"modelpool={self.names['modelpool']}", f"taskpool={self.names[split]}"]).taskpool
            pool = instantiate(cfg)
            datasets = {t: instantiate(d) for t, d in cfg.test_datasets.items() if not tasks or t in tasks}
            if self.rows[split]:
                datasets = {t: d.select(range(min(len(d), self.rows[split]))) for t, d in datasets.items()}
            pool.test_datasets = datasets
            if hasattr(pool, "_test_datasets"):  # FusionBench's CLIP task pool reloads these in setup()
                pool._test_datasets = datasets
            if self.taskpools and hasattr(pool, "_heads"):  # share the heads: they depend only on the pretrained encoder
                pool._heads = next(iter(self.taskpools.values()))._heads
            self.taskpools[key] = pool
        return self.taskpools[key]

    def evaluate(self, model, split: str, tasks: list[str] | None = None) -> dict:
        start = time.perf_counter()
        report = self.taskpool(split, tasks).evaluate(model)
        report["eval_seconds"] = time.perf_counter() - start
        return report

    def merge(self, method: str, overrides: list[str]) -> tuple[Any, dict, float]:
        """(model, extras, seconds) of ``fusion_bench method=<method> <overrides>`` on the zoo's pool."""
        pave = method.startswith("pave_")
        extra = [f"method.cache_dir={self.cache_dir / 'pave_covariance'}", *self.names.get("pave", [])] if pave else []
        cfg = compose([f"method={method}", f"modelpool={self.names['modelpool']}", *overrides, *extra])
        modelpool, algorithm = instantiate(cfg.modelpool), instantiate(cfg.method)
        start = time.perf_counter()
        out = algorithm.run(modelpool)
        seconds = time.perf_counter() - start
        if isinstance(out, dict):
            return out["model"], {k: v for k, v in out.items() if k != "model"}, seconds
        return out, {}, seconds

    def model_names(self) -> list[str]:
        return list(instantiate(compose([f"modelpool={self.names['modelpool']}"]).modelpool).model_names)

    def load(self, name: str):
        pool = instantiate(compose([f"modelpool={self.names['modelpool']}"]).modelpool)
        return pool.load_model(name)


def tune(bench: Bench, method: str, grid: list[list[str]], validate: bool = False) -> dict:
    """Merge with every override set of ``grid``, keep the best on validation, test it once
    (a single-entry grid is tested directly, and scored on validation too if ``validate``)."""
    best: dict | None = None
    trials = []
    for overrides in grid:
        model, extras, seconds = bench.merge(method, overrides)
        trial = {"overrides": overrides, "merge_seconds": seconds}
        if len(grid) > 1 or validate:
            trial["val_accuracy"] = bench.evaluate(model, "val")["average"]["accuracy"]
            logging.info(f"{method} {overrides}: val {trial['val_accuracy']:.4f} ({seconds:.1f}s merge)")
        trials.append(trial)
        if best is None or len(grid) > 1 and trial["val_accuracy"] > best["trial"]["val_accuracy"]:
            best = {"trial": trial, "model": model, "extras": extras}
    test = bench.evaluate(best["model"], "test")
    kept = best["extras"].get("pave", {}).get("kept_ratio")
    return {
        "method": method, "chosen": best["trial"]["overrides"], "val_accuracy": best["trial"].get("val_accuracy"),
        "test": test, "merge_seconds": best["trial"]["merge_seconds"], "trials": trials,
        **({"pave_kept_ratio": kept} if kept else {}),
    }


def own_task_row(bench: Bench, name: str, method: str, tasks: list[str], model_of) -> dict:
    """A row whose every task is scored by its own model ``model_of(task)`` on that task alone."""
    per_task, params = {}, None
    for task in tasks:
        report = bench.evaluate(model_of(task), "test", [task])
        per_task[task] = report[task]
        params = report["model_info"]["all_params"]
    common = [k for k in per_task[tasks[0]] if all(k in r for r in per_task.values())]
    mean = {k: sum(r[k] for r in per_task.values()) / len(per_task) for k in common}
    return {"name": name, "method": method, "test": {**per_task, "average": mean, "model_info": {"all_params": params}}}


# diagnostic (b): PAVE with its removed part replaced by random components of the same C-weighted energy
RANDOM_CONTROL = ["method._target_=benchmarks.random_control.RandomControlPAVE"]


def purified_alone(bench: Bench, task: str, tasks: list[str], rho: float, calibration: list[str]):
    """``task``'s fine-tuned model purified by PAVE at ``rho`` with no other task in the pool (or by
    the random control, if ``calibration`` holds RANDOM_CONTROL)."""
    others = [f"~modelpool.models.{t}" for t in tasks if t != task]
    model, _, _ = bench.merge("pave_ta", [*others, "method.merger.scaling_factor=1.0", f"method.rho={rho}", *calibration])
    return model


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'LABEL=key=value,key=value' -> (LABEL, ['method.key=value', ...]) (a PAVE variant of --variant)."""
    label, _, overrides = text.partition("=")
    if not label or not overrides:
        raise argparse.ArgumentTypeError(f"--variant wants LABEL=key=value[,key=value...]; got {text!r}")
    return label, [o if o.startswith("method.") else f"method.{o}" for o in overrides.split(",")]


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fusion_bench_pave.assets import cache_root

    bench = Bench(args.zoo, cache_root(), args.val_rows, args.test_rows)
    rows: list[dict] = []

    start = time.perf_counter()

    def record(row: dict) -> None:
        rows.append(row)
        write_outputs({"zoo": args.zoo, "args": vars(args), "rows": rows, "tasks": tasks,
                       "total_seconds": time.perf_counter() - start}, out)
        logging.info(f"{row['name']}: test {row['test']['average']['accuracy']:.4f}")

    tasks = bench.model_names()
    pretrained = bench.load("_pretrained_")
    pretrained_row = "Pretrained body (task heads)" if bench.names["test"] == "zoo_minilm_glue" else "Pretrained (zero-shot)"
    record({"name": pretrained_row, "method": "pretrained", "test": bench.evaluate(pretrained, "test")})

    record(own_task_row(bench, "Individual (each on its own task)", "individual", tasks, bench.load))

    # PAVE keeps the base method's lambda (chosen on validation) and chooses rho on validation
    # (--rhos), or keeps its yaml's rho (the paper's value) if --rhos is not given; calibration
    # inputs are truncated like the zoo's training and evaluation inputs
    default_rho = OFFICIAL_RHO.get(args.official)
    rhos = [f"method.rho={x}" for x in args.rhos] if args.rhos else [f"method.rho={default_rho}" if default_rho else None]
    calibration = [f"method.max_length={args.max_length}", f"method.num_samples={args.num_samples}",
                   *OFFICIAL_PROTOCOLS.get(args.official, [])]
    def attempt(name: str, step) -> dict | None:
        """Run one row; a failure is recorded (and reported) instead of ending the run."""
        try:
            return step()
        except Exception as error:  # noqa: BLE001 - one broken method must not hide the others
            logging.exception(f"{name} failed")
            rows.append({"name": name, "error": f"{type(error).__name__}: {error}"})
            return None

    alone = [("Purified alone", [])] + ([("Random control alone", RANDOM_CONTROL)] if args.random_control else [])
    for rho, (label, control) in itertools.product(args.purified_alone or [], alone):
        # diagnostic: each task's purified model on its own (pretrained + 1.0 * purified task vector);
        # with --random-control also its random control of the same C-weighted energy
        name = f"{label} (rho={rho:g})"
        if (row := attempt(name, lambda: own_task_row(bench, name, "pave_ta", tasks, lambda task: purified_alone(
                bench, task, tasks, rho, [*calibration, *control])))) is not None:
            record(row)

    smile_keys = bench.names["smile"]

    def smile(gate_k: int, k: int) -> dict:
        overrides = [f"{smile_keys['gate_k']}={gate_k}", f"{smile_keys['k']}={k}"]
        model, _, seconds = bench.merge(smile_keys["method"], overrides)
        return {"name": f"SMILE (gate_k={gate_k}, k={k})", "method": smile_keys["method"],
                "chosen": {"gate_k": gate_k, "k": k}, "merge_seconds": seconds, "test": bench.evaluate(model, "test")}

    for name, method, pave, tuned in BASELINES:
        if method == "smile":
            method = smile_keys["method"]
        if args.only and method not in args.only and (pave or "") not in args.only:
            continue
        if method == smile_keys["method"]:
            for gate_k, k in itertools.product(args.gate_k, args.k):
                if (row := attempt(f"SMILE (gate_k={gate_k}, k={k})", lambda: smile(gate_k, k))) is not None:
                    record(row)
            continue
        grid = [[f"method.scaling_factor={x}"] for x in args.lambdas] if tuned else [[]]
        result = attempt(name, lambda: tune(bench, method, grid, args.validate))
        if result is None:
            continue
        record({"name": name, **result})
        if pave is None:
            continue
        merger = [o.replace("method.", "method.merger.", 1) for o in result["chosen"]]
        # the paper's PAVE, each --variant of it, and the random control of the paper's PAVE
        variants = [("PAVE", [])] + [(f"PAVE[{label}]", extra) for label, extra in args.variant]
        variants += [("Random control", RANDOM_CONTROL)] if args.random_control else []
        for label, extra in variants:
            pave_grid = [[*merger, *([r] if r else []), *calibration, *extra] for r in rhos]
            if (pave_result := attempt(f"{label} + {name}", lambda: tune(bench, pave, pave_grid, args.validate))) is not None:
                record({"name": f"{label} + {name}", **pave_result})

    result = {"zoo": args.zoo, "args": vars(args), "rows": rows,
              "total_seconds": time.perf_counter() - start, "tasks": tasks}
    write_outputs(result, out)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=sorted(ZOOS), nargs="+", default=["minilm"],
                        help="one zoo, or the seeds of one recipe (each run into <out>/<zoo>, summary in <out>/seeds.md)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results/<first zoo>)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 0.6, 1.0])
    parser.add_argument("--rhos", type=float, nargs="+", default=None,
                        help="PAVE rho grid chosen on validation (default: each method yaml's paper rho)")
    parser.add_argument("--max-length", type=int, default=64, help="PAVE calibration truncation")
    parser.add_argument("--num-samples", type=int, default=128, help="PAVE calibration samples per task")
    parser.add_argument("--official", nargs="?", const="glue", choices=sorted(OFFICIAL_PROTOCOLS), default=None,
                        help="PAVE under an official protocol: glue (the default; per_model, first 4096 rows, "
                             "padding longest) or llm (uniform, rho 4089/4096, eps doubled from 0.01)")
    parser.add_argument("--purified-alone", type=float, nargs="+", default=None, metavar="RHO",
                        help="diagnostic: each task's PAVE-purified model alone on its task, at these rho")
    parser.add_argument("--random-control", action="store_true",
                        help="diagnostic: beside each PAVE row (and each --purified-alone row) the same run with "
                             "PAVE's removed part replaced by random components of equal C-weighted energy")
    parser.add_argument("--variant", type=parse_variant, nargs="+", default=[], metavar="LABEL=KEY=VALUE[,...]",
                        help="PAVE variants run beside each PAVE row, e.g. tau=purify_target=task_vector")
    parser.add_argument("--validate", action="store_true",
                        help="score rows with a single setting on validation too")
    parser.add_argument("--gate-k", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--val-rows", type=int, default=None, help="first N validation rows per task")
    parser.add_argument("--test-rows", type=int, default=None, help="first N test rows per task")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only these fusion_bench methods (with --paper: these presets)")
    parser.add_argument("--paper", choices=sorted(PAPERS), default=None,
                        help="run this paper's presets and write its table (needs the hub, or --replica)")
    parser.add_argument("--replica", action="store_true", help="with --paper: on tiny offline replicas")
    parser.add_argument("--set", nargs="+", default=[], metavar="[FAMILY:]OVERRIDE",
                        help="with --paper: CLI overrides for every preset, or for one family's")
    args = parser.parse_args(argv)
    if args.paper is None and (args.replica or args.set):
        parser.error("--replica and --set go with --paper")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.paper or args.replica:  # offline zoos and replicas; a paper's presets need the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.paper:
        out = Path(args.out or Path(__file__).resolve().parent / "results" / f"paper_{args.paper}{'_replica' if args.replica else ''}")
        summary = reproduce_paper(args.paper, out, args.replica, args.only, args.set)
        print((out / "results.md").read_text())
        sys.exit(1 if any("error" in row for row in summary["rows"]) else 0)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / args.zoo[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = []
    for zoo in args.zoo:
        run_args = argparse.Namespace(**{**vars(args), "zoo": zoo, "out": str(out / zoo if len(args.zoo) > 1 else out)})
        results.append(run(run_args))
        print((Path(run_args.out) / "results.md").read_text())
        print(f"total {results[-1]['total_seconds']:.0f}s")
    if len(results) > 1:
        summary = seed_summary(results)
        (out / "seeds.json").write_text(json.dumps(summary, indent=2))
        (out / "seeds.md").write_text(seed_table(summary))
        print(seed_table(summary))


if __name__ == "__main__":
    main()
