"""PAVE purification speed and peak memory: ours vs the official procedure (reference/official_pave.py).

For each shape setting a reduced model is built in-process with random weights at the real widths
(BertModel for MiniLM, CLIPVisionModel for ViT-B/32, MistralModel for a Mistral-7B layer), T
fine-tuned copies are made by seeded perturbation, and each task gets seeded calibration inputs
giving exactly N token rows (reference/pave_comparison.py, which also runs both procedures). The `minilm_zoo` setting instead takes the real MiniLM zoo (all six
layers, real fine-tuned weights, N rows of each task's real training text; built first if missing),
where activations are far less isotropic than random inputs. Both procedures run on the same models and rows, each in a fresh
subprocess (peak RSS = VmHWM of that child, so they don't contaminate each other), alternating
ours/official for every repeat so load on the shared machine hits both alike. The purified Linear
weights of the first repeat are compared (max over layers and tasks of ||W_ours - W_off||_F / ||W_off||_F).

Both sides use rho = 0.9 and the official per-model rank collapse (allocation=per_model). At Mistral
width the default purifies k_proj/v_proj only (GQA, 1024 x 4096, d_in = 4096): one fp32 inverse of
the 14336^2 down_proj covariance, or a full SVD of a 4096-wide product, takes minutes on 2 cores;
widen with --mistral-modules.

    python -m benchmarks.perf_pave [--quick] [--repeats 3] [--settings minilm vit_b32 mistral_layer]
Prints a table and writes JSON to --out (default benchmarks/results/perf_pave.json).
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
from typing import Any, Iterator

import torch
from torch import nn

from benchmarks.child import vm_hwm_mb
from reference import pave_comparison
from reference.pave_comparison import MISTRAL_LINEARS, RHO, run_official, run_ours

REPO_ROOT = Path(__file__).resolve().parent.parent

SETTINGS: dict[str, dict[str, Any]] = {
    "minilm": dict(kind="bert", hidden=384, ffn=1536, heads=12, layers=2, tasks=3, rows=4096, seq=128, batch=8, eps0=0.1),
    "vit_b32": dict(kind="clip", hidden=768, ffn=3072, heads=12, layers=2, tasks=3, rows=4096, batch=16, eps0=0.1),
    # the real MiniLM zoo (all 6 layers, real fine-tuned weights, real text of each task's train split)
    "minilm_zoo": dict(kind="zoo_minilm", tasks=3, rows=4096, seq=128, batch=8, eps0=0.1),
    "mistral_layer": dict(kind="mistral", hidden=4096, ffn=14336, heads=32, kv_heads=8, layers=1, tasks=2, rows=256,
                          seq=128, batch=2, eps0=0.01, modules=["k_proj", "v_proj"]),
}
QUICK = {"minilm": dict(layers=1, tasks=2, rows=1024), "vit_b32": dict(layers=1, tasks=2, rows=1024)}


def build_zoo(setting: dict) -> tuple[nn.Module, dict[str, nn.Module], dict[str, list[dict]]]:
    """The MiniLM zoo's pretrained encoder, its first T fine-tuned copies, and per task `rows` token
    rows of that task's training texts: tokenized, concatenated and cut into unpadded sequences
    (padding would be masked by ours and not by the official code, so neither side sees any)."""
    import datasets
    from transformers import AutoModel, AutoTokenizer

    from fusion_bench_pave.assets import ensure_zoo

    root = ensure_zoo("minilm")
    load = lambda path: AutoModel.from_pretrained(path, add_pooling_layer=False).eval()  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(root / "pretrained")
    tasks = sorted(p.name for p in (root / "models").iterdir())[: setting["tasks"]]
    batches = {}
    for task in tasks:
        texts = list(datasets.load_from_disk(str(root / "data" / task / "train"))["text"])
        stream = torch.tensor([i for ids in tokenizer(texts)["input_ids"] for i in ids])
        sequences = -(-setting["rows"] // setting["seq"])
        if stream.numel() < sequences * setting["seq"]:
            raise ValueError(f"{task}: {stream.numel()} training tokens, fewer than the {setting['rows']} rows asked for")
        ids = stream[: sequences * setting["seq"]].view(sequences, setting["seq"])
        batches[task] = [{"input_ids": i} for i in ids.split(setting["batch"])]
    return load(root / "pretrained"), {t: load(root / "models" / t) for t in tasks}, batches


def build(setting: dict) -> tuple[nn.Module, dict[str, nn.Module], dict[str, list[dict]]]:
    """(pretrained, {task: fine-tuned}, {task: batches}): the real zoo, or seeded random models."""
    return build_zoo(setting) if setting["kind"] == "zoo_minilm" else pave_comparison.build(setting)


# ----------------------------------------------------------------------------- child process
def child(args: dict) -> dict:
    """Build, time one procedure, optionally save the purified weights; report time and memory.
    The official child also saves a float64 run of the baseline (after the peak RSS is read)."""
    import psutil
    from safetensors.torch import save_file

    torch.set_num_threads(args["threads"])
    setting = args["setting"]
    pretrained, finetuned, batches = build(setting)
    base_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if args["procedure"] == "ours":
        weights, ranks = run_ours(finetuned, batches, setting)
    else:
        weights, ranks = run_official(pretrained, finetuned, batches, setting)
    seconds = time.perf_counter() - start
    peak = vm_hwm_mb() * 2**20
    if args.get("save"):
        tensors = {f"{t}/{l}": w.contiguous() for t, ws in weights.items() for l, w in ws.items()}
        if args["procedure"] == "official":
            pre = dict(pretrained.named_parameters())
            tensors |= {f"pre/{l}": pre[f"{l}.weight"].detach().contiguous() for l in weights[next(iter(weights))]}
            del weights
            exact, _ = run_official(pretrained, finetuned, batches, setting, dtype=torch.float64)
            tensors |= {f"f64/{t}/{l}": w.contiguous() for t, ws in exact.items() for l, w in ws.items()}
        save_file(tensors, args["save"])
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "base_rss_mb": base_rss / 2**20, "ranks": ranks}


def spawn(procedure: str, setting: dict, save: str | None, threads: int) -> dict:
    payload = json.dumps({"procedure": procedure, "setting": setting, "save": save, "threads": threads})
    # every BLAS/OpenMP pool of the child gets `threads`, not only torch's
    env = os.environ | {var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf_pave", "--child", payload], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{procedure} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(ours_path: str, official_path: str) -> dict[str, float]:
    """Max relative Frobenius differences of our purified weights (and task vectors) from the
    official procedure's, in float32 (as timed) and in float64."""
    from safetensors import safe_open

    worst = dict.fromkeys(["max_rel_diff_weights", "max_rel_diff_task_vectors", "max_rel_diff_weights_f64"], 0.0)
    with safe_open(ours_path, "pt") as ours, safe_open(official_path, "pt") as off:
        for key in ours.keys():
            a, b = ours.get_tensor(key).double(), off.get_tensor(key).double()
            exact = off.get_tensor(f"f64/{key}")
            pre = off.get_tensor(f"pre/{key.split('/', 1)[1]}").double()
            diff = torch.linalg.norm(a - b)
            for name, value in [("max_rel_diff_weights", diff / torch.linalg.norm(b)),
                                ("max_rel_diff_task_vectors", diff / torch.linalg.norm(b - pre)),
                                ("max_rel_diff_weights_f64", torch.linalg.norm(a - exact) / torch.linalg.norm(exact))]:
                worst[name] = max(worst[name], float(value))
    return worst


def bench_setting(name: str, setting: dict, repeats: int, threads: int, tmp: str) -> dict:
    times: dict[str, list[float]] = {"ours": [], "official": []}
    results: dict[str, dict] = {}
    paths = {p: os.path.join(tmp, f"{name}_{p}.safetensors") for p in times}
    for rep in range(repeats):
        for procedure in times:
            print(f"[{name}] repeat {rep + 1}/{repeats}: {procedure} ...", flush=True)
            result = spawn(procedure, setting, paths[procedure] if rep == 0 else None, threads)
            times[procedure].append(result["seconds"])
            if rep == 0:
                results[procedure] = result
            else:  # peak over repeats
                results[procedure]["peak_rss_mb"] = max(results[procedure]["peak_rss_mb"], result["peak_rss_mb"])
    diffs = compare(paths["ours"], paths["official"])
    for path in paths.values():
        os.remove(path)
    ours_t, off_t = statistics.median(times["ours"]), statistics.median(times["official"])
    row = {
        "setting": name,
        "config": setting,
        "ours_s": ours_t,
        "official_s": off_t,
        "speedup": off_t / ours_t,
        "ratio_per_repeat": [o / u for u, o in zip(times["ours"], times["official"])],
        **diffs,
        "ranks_equal": results["ours"]["ranks"] == results["official"]["ranks"],
        "ours_peak_rss_mb": results["ours"]["peak_rss_mb"],
        "official_peak_rss_mb": results["official"]["peak_rss_mb"],
        "ours_extra_rss_mb": results["ours"]["peak_rss_mb"] - results["ours"]["base_rss_mb"],
        "official_extra_rss_mb": results["official"]["peak_rss_mb"] - results["official"]["base_rss_mb"],
        "times": times,
    }
    print(json.dumps({k: v for k, v in row.items() if k not in ("config", "times")}), flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("setting", "ours s", "official s", "speed-up", "max rel dW", "max rel dtau", "dW vs f64 official", "ranks eq",
            "ours peak MB (+extra)", "official peak MB (+extra)")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join([
            r["setting"], f"{r['ours_s']:.2f}", f"{r['official_s']:.2f}", f"{r['speedup']:.2f}x",
            f"{r['max_rel_diff_weights']:.1e}", f"{r['max_rel_diff_task_vectors']:.1e}",
            f"{r['max_rel_diff_weights_f64']:.1e}", str(r["ranks_equal"]),
            f"{r['ours_peak_rss_mb']:.0f} (+{r['ours_extra_rss_mb']:.0f})",
            f"{r['official_peak_rss_mb']:.0f} (+{r['official_extra_rss_mb']:.0f})",
        ]))
    return "\n".join(lines)


def write_results(path: str, rows: list[dict], **meta: Any) -> None:
    """JSON of a benchmark run: `meta`, torch's version, the load at the end and the rows."""
    out = {**meta, "torch": torch.__version__, "load_avg_1m_at_end": os.getloadavg()[0], "rows": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


def iter_settings(names: list[str], quick: bool, mistral_modules: list[str] | None) -> Iterator[tuple[str, dict]]:
    for name in names:
        setting = dict(SETTINGS[name])
        if quick:
            if name not in QUICK:
                continue
            setting |= QUICK[name]
        if name == "mistral_layer" and mistral_modules:
            setting["modules"] = mistral_modules
        yield name, setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run (small MiniLM/ViT, no Mistral)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per procedure (Mistral: 1)")
    parser.add_argument("--mistral-modules", nargs="+", choices=MISTRAL_LINEARS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per child; 1 by default: on 2 shared, oversubscribed cores 2 OpenMP threads stall LAPACK calls by up to 50x at random")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "perf_pave.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, setting in iter_settings(args.settings, args.quick, args.mistral_modules):
            repeats = 1 if args.quick or name == "mistral_layer" else args.repeats
            rows.append(bench_setting(name, setting, repeats, args.threads, tmp))
    print(table(rows))
    write_results(args.out, rows, quick=args.quick, threads=args.threads, rho=RHO)


if __name__ == "__main__":
    main()
