"""Peak memory and time of the streamed PAVE merge of causal LMs vs depth, at Mistral-7B width.

For each depth, writes a Mistral-7B-width checkpoint (hidden 4096, intermediate 14336, 32 heads / 8 KV
heads, small vocab; benchmarks.perf_smile_streaming.write_checkpoints) and 2 fine-tuned copies as bf16
safetensors into a temp dir, then runs ``pave_merge_causal_lm_checkpoints`` (statistics layer by layer,
purification, streamed Task Arithmetic) in a fresh subprocess and records its peak RSS (VmHWM) and time.
Flat peak RSS across depths means a 32-layer Mistral-7B needs no more memory than one layer; the last
row projects full depth from the measured ones.

The official LLM protocol otherwise (rho 4089/4096, uniform, eps0 0.01, eps_tol 1e-2, weights used in
float32), but by default only the k/v projections are purified and the calibration is one sequence of
128 tokens: purifying q/o/gate/up/down takes five float64 eigendecompositions of 4096 x 4096 Gram
matrices per layer and model. The default run takes about 8.5 minutes on 2 cores (25 minutes when other
jobs share them).
``--purify all --tokens 512`` is the full protocol (hours on 2 cores).

    python -m benchmarks.perf_pave_streaming [--depths 1 2 3] [--models 2] [--purify k_proj v_proj | all] [--tokens 128]
Writes a table to stdout and JSON to --out (default benchmarks/results/perf_pave_streaming.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.child import print_table, run_child
from benchmarks.perf_smile_streaming import MISTRAL_7B_LAYERS, VOCAB, generated_checkpoints, projection

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = """
import json, sys, time
import torch
from fusion_bench_pave.merging.stream import TaskArithmetic
from fusion_bench_pave.pave.causal_lm_purification import StreamedCollection, pave_merge_causal_lm_checkpoints
from fusion_bench_pave.pave.purification import PurifySettings
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
ids = torch.randint(0, args["vocab"], (1, args["tokens"]), generator=torch.Generator().manual_seed(0))
batches = {task: [({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None)] for task in args["finetuned"]}
purify = tuple(args["purify"])
start = time.perf_counter()
result = pave_merge_causal_lm_checkpoints(
    args["base"], args["finetuned"], args["out"], TaskArithmetic(1.0), batches,
    PurifySettings(rho=4089 / 4096, allocation="uniform", eps0=0.01, eps_tol=0.01),
    collection=StreamedCollection(include=lambda name, module: name.rsplit(".", 1)[-1] in purify,
                                  model_dtype=torch.float32),
    scratch_dir=args["scratch"], max_shard_bytes=args["max_shard_bytes"], progress=False)
# VmHWM is this process image's own high-water mark (ru_maxrss would include the forked parent's RSS)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
kept = {task: sum(ranks.values()) / sum(result.full_ranks.values()) for task, ranks in result.ranks.items()}
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": hwm_kb / 1024, "kept": kept}))
"""


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for depth in args.depths:
        with generated_checkpoints(args.tmp, depth, args.models) as (tmp, base, finetuned, generate_s, input_gb):
            child = {"base": str(base), "finetuned": {f"ft{i}": str(path) for i, path in enumerate(finetuned)},
                     "out": str(tmp / "merged"), "scratch": str(tmp), "purify": args.purify, "tokens": args.tokens,
                     "vocab": VOCAB, "max_shard_bytes": args.max_shard_mb * 2**20, "threads": torch.get_num_threads()}
            result = run_child(CHILD, child)
            output_gb = sum(f.stat().st_size for f in (tmp / "merged").glob("*.safetensors")) / 2**30
        row = {"depth": depth, "models": args.models, "input_gb": round(input_gb, 2), "output_gb": round(output_gb, 2),
               "peak_rss_mb": round(result["peak_rss_mb"]), "pave_merge_s": round(result["seconds"], 1),
               "generate_s": round(generate_s, 1), "kept_ratio": round(min(result["kept"].values()), 4)}
        rows.append(row)
        print(row, flush=True)
    if len(rows) > 1:
        rows.append(projection(rows, MISTRAL_7B_LAYERS, time_key="pave_merge_s", count_key="models"))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", type=int, default=2, help="fine-tuned models")
    parser.add_argument("--purify", nargs="+", default=["k_proj", "v_proj"], help=f"Linears purified: some of {LINEARS}, or all")
    parser.add_argument("--tokens", type=int, default=128, help="calibration tokens (one sequence; the official N is 512)")
    parser.add_argument("--max-shard-mb", type=int, default=512)
    parser.add_argument("--tmp", default=None, help="directory for the generated checkpoints (~1.8 GB per layer and model)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.purify == ["all"]:
        args.purify = LINEARS
    rows = run(args)
    out = Path(args.out or Path(__file__).parent / "results" / "perf_pave_streaming.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print_table(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
