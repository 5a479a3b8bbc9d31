"""Peak memory of streaming SMILE upscaling vs depth, and SMILE speed vs FusionBench's implementation.

Streaming (default): for each depth, writes a Mistral-7B-width checkpoint (hidden 4096,
intermediate 14336, 32 heads / 8 KV heads, small vocab) plus T fine-tuned copies as bf16
safetensors shards (one shard per layer) into a temp dir, then runs
``upscale_causal_lm_checkpoint`` in a fresh subprocess and records its peak RSS (VmHWM).
Flat peak RSS across depths means a 32-layer Mistral-7B needs no more memory than one layer.

Speed (``--speed``): upscaling time and forward time of our SMILE vs FusionBench's
``SmileUpscalingAlgorithm`` on a CLIP-ViT-B-width vision tower (in memory, CPU).

    python -m benchmarks.perf_smile_streaming [--depths 1 2 3] [--experts 3] [--rank-of-expert 32]
    python -m benchmarks.perf_smile_streaming --speed
Writes a table to stdout and JSON to --out (default benchmarks/results/perf_smile_*.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.child import print_table, run_child, vm_hwm_mb

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 1024

CHILD = """
import json, sys, time
import torch
import fusion_bench_pave.smile.causal_lm
from fusion_bench_pave.smile.causal_lm.upscale import SmileSettings, upscale_causal_lm_checkpoint
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
start = time.perf_counter()
upscale_causal_lm_checkpoint(args["base"], args["experts"], args["out"],
    SmileSettings(rank_of_router=args["rank_of_router"], rank_of_expert=args["rank_of_expert"]),
    max_shard_bytes=args["max_shard_bytes"], progress=False)
# VmHWM is this process image's own high-water mark (ru_maxrss would include the forked parent's RSS)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": hwm_kb / 1024}))
"""


def write_checkpoints(root: Path, depth: int, experts: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """Base + ``experts`` fine-tuned bf16 checkpoints, one safetensors shard per layer, generated layer by layer."""
    from safetensors.torch import save_file
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=depth,
                           num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False, dtype="bfloat16")
    head_dim = HIDDEN // HEADS
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * head_dim, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * head_dim, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(experts)]
    gen = torch.Generator().manual_seed(seed)
    weight_maps: list[dict[str, str]] = [{} for _ in dirs]
    for d in dirs:
        d.mkdir(parents=True)
        config.save_pretrained(d)
    shared = {"model.embed_tokens.weight": 0.02 * torch.randn(VOCAB, HIDDEN, generator=gen), "model.norm.weight": torch.ones(HIDDEN),
              "lm_head.weight": 0.02 * torch.randn(VOCAB, HIDDEN, generator=gen)}
    shards = [("model-shared.safetensors", shared)]
    for layer in range(depth):
        base = {f"model.layers.{layer}.{name}.weight": 0.02 * torch.randn(shape, generator=gen) for name, shape in shapes.items()}
        base |= {f"model.layers.{layer}.input_layernorm.weight": torch.ones(HIDDEN),
                 f"model.layers.{layer}.post_attention_layernorm.weight": torch.ones(HIDDEN)}
        shards.append((f"model-layer{layer:03d}.safetensors", base))
    for file, tensors in shards:
        for i, d in enumerate(dirs):
            out = {}
            for name, t in tensors.items():
                if i > 0 and name.endswith("_proj.weight"):  # a decaying rank-64 update, like fine-tuning
                    m, n = t.shape
                    scale = (0.9 ** torch.arange(64, dtype=torch.float32)) * 2e-3
                    t = t + (torch.randn(m, 64, generator=gen) * scale) @ torch.randn(64, n, generator=gen) / n**0.5
                out[name] = t.to(torch.bfloat16)
            save_file(out, str(d / file), metadata={"format": "pt"})
            weight_maps[i] |= dict.fromkeys(out, file)
            del out
    for d, wm in zip(dirs, weight_maps):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dirs[0], dirs[1:]


@contextmanager
def generated_checkpoints(root: str | None, depth: int, count: int) -> Iterator[tuple[Path, Path, list[Path], float, float]]:
    """A temporary directory (under ``root``) holding ``write_checkpoints``' base and ``count`` fine-tuned
    copies: (directory, base, copies, seconds to write them, their GB)."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        start = time.perf_counter()
        base, copies = write_checkpoints(Path(tmp), depth, count)
        seconds = time.perf_counter() - start
        yield Path(tmp), base, copies, seconds, sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors")) / 2**30


def streaming(args: argparse.Namespace) -> list[dict]:
    rows = []
    for depth in args.depths:
        with generated_checkpoints(args.tmp, depth, args.experts) as (tmp, base, experts, gen_seconds, input_gb):
            child = {"base": str(base), "experts": [str(e) for e in experts], "out": str(Path(tmp) / "smile"),
                     "rank_of_router": args.rank_of_router, "rank_of_expert": args.rank_of_expert,
                     "max_shard_bytes": args.max_shard_mb * 2**20, "threads": torch.get_num_threads()}
            result = run_child(CHILD, child)
            output_gb = sum(f.stat().st_size for f in (Path(tmp) / "smile").glob("*.safetensors")) / 2**30
        row = {"depth": depth, "experts": args.experts, "input_gb": round(input_gb, 2), "output_gb": round(output_gb, 2),
               "peak_rss_mb": round(result["peak_rss_mb"]), "upscale_s": round(result["seconds"], 1), "generate_s": round(gen_seconds, 1)}
        rows.append(row)
        print(row, flush=True)
    if len(rows) > 1:
        rows.append(projection(rows, MISTRAL_7B_LAYERS))
        print(rows[-1], flush=True)
    return rows


MISTRAL_7B_LAYERS = 32


def projection(rows: list[dict], layers: int, time_key: str = "upscale_s", count_key: str = "experts") -> dict:
    """Full-depth estimate from the measured depths. Time: the deepest run's seconds per layer (its
    one-off costs spread over its layers, so an upper bound; a line fit is useless when the load of
    the shared machine changes between depths). Peak RSS: the measured maximum plus the least-squares
    growth per layer (streaming holds one layer at a time, so the growth should be ~0)."""
    depths = [r["depth"] for r in rows]
    rss = [r["peak_rss_mb"] for r in rows]
    mean_d, mean_r = statistics.mean(depths), statistics.mean(rss)
    rss_slope = sum((d - mean_d) * (v - mean_r) for d, v in zip(depths, rss)) / sum((d - mean_d) ** 2 for d in depths)
    deepest = max(rows, key=lambda r: r["depth"])
    per_layer_s = deepest[time_key] / deepest["depth"]
    return {"depth": f"{layers} (projected)", count_key: rows[0][count_key],
            "input_gb": round(deepest["input_gb"] / deepest["depth"] * layers, 1),
            "output_gb": round(deepest["output_gb"] / deepest["depth"] * layers, 1),
            "peak_rss_mb": round(max(rss) + max(0.0, rss_slope) * (layers - max(depths))),
            time_key: round(per_layer_s * layers), f"{time_key}_per_layer": round(per_layer_s, 1),
            "peak_rss_mb_per_layer": round(rss_slope, 1)}


def param_mb(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def speed(args: argparse.Namespace) -> list[dict]:
    """Upscaling time (ours vs FusionBench, same models) and forward latency of the dense pretrained
    model, our SMILE model and FusionBench's SmileMoELinear model, side by side: every repeat times
    the three forwards in rotated order, medians per model, for each torch thread count (process CPU
    time with 1 thread, wall time with more)."""
    import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
    from fusion_bench.method import SmileUpscalingAlgorithm as FusionBenchSmile
    from fusion_bench.modelpool import BaseModelPool
    from fusion_bench_pave.smile.upscale import upscale_model
    from reference.tiny_models import clip_vision

    pre = clip_vision(0, hidden_size=768, intermediate_size=3072, num_hidden_layers=args.speed_layers,
                      num_attention_heads=12, image_size=224, patch_size=32)
    fts = []
    for _ in range(args.speed_experts):
        m = copy.deepcopy(pre)
        with torch.no_grad():  # decaying-spectrum rank-64 update plus small dense noise, like fine-tuning
            for p in m.parameters():
                if p.ndim == 2:
                    decay = 0.9 ** torch.arange(64, dtype=torch.float32)
                    p.add_((torch.randn(p.shape[0], 64) * decay) @ torch.randn(64, p.shape[1]) * (1e-3 / 8) + 1e-5 * torch.randn_like(p))
        fts.append(m)
    x = torch.randn(args.batch, 3, 224, 224)
    rows = []
    for gate_k, k, top_k in [(16, 32, 1), (16, 32, 2)]:
        torch.set_num_threads(args.speed_threads[0])
        t0 = time.perf_counter()
        ours, _ = upscale_model(copy.deepcopy(pre), fts, gate_k=gate_k, k=k, top_k=top_k, progress=False)
        t_ours = time.perf_counter() - t0
        pool = BaseModelPool({"_pretrained_": copy.deepcopy(pre), **{f"m{i}": copy.deepcopy(m) for i, m in enumerate(fts)}})
        t0 = time.perf_counter()
        theirs = FusionBenchSmile(device="cpu", gate_k=gate_k, k=k, top_k=top_k, routing_use_diff=True, average_experts=False).run(pool)
        t_theirs = time.perf_counter() - t0
        models = {"dense": pre, "ours": ours.eval(), "fusion_bench": theirs.eval()}
        with torch.no_grad():
            outputs = {label: model(pixel_values=x).last_hidden_state for label, model in models.items()}
            scale = float(outputs["fusion_bench"].abs().max())
            for threads in args.speed_threads:
                torch.set_num_threads(threads)
                times: dict[str, list[float]] = {label: [] for label in models}
                labels = list(models)
                for model in models.values():  # warm-up
                    model(pixel_values=x)
                # 1 thread: CPU time of the process, which other jobs on the shared cores don't inflate
                clock = time.process_time if threads == 1 else time.perf_counter
                for rep in range(args.repeats):
                    for label in labels[rep % 3:] + labels[: rep % 3]:
                        t0 = clock()
                        models[label](pixel_values=x)
                        times[label].append(clock() - t0)
                ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}
                row = {"gate_k": gate_k, "k": k, "top_k": top_k, "experts": args.speed_experts, "layers": args.speed_layers,
                       "batch": args.batch, "threads": threads, "clock": "cpu" if threads == 1 else "wall",
                       "upscale_s_ours": round(t_ours, 2), "upscale_s_fusion_bench": round(t_theirs, 2),
                       "upscale_speedup": round(t_theirs / t_ours, 1),
                       "forward_ms_dense": round(ms["dense"], 1), "forward_ms_ours": round(ms["ours"], 1),
                       "forward_ms_fusion_bench": round(ms["fusion_bench"], 1),
                       "forward_speedup_vs_fusion_bench": round(ms["fusion_bench"] / ms["ours"], 2),
                       "forward_ratio_vs_dense": round(ms["ours"] / ms["dense"], 2),
                       "max_rel_diff_vs_fusion_bench": float((outputs["ours"] - outputs["fusion_bench"]).abs().max()) / scale,
                       "params_mb_dense": round(param_mb(pre)), "params_mb_ours": round(param_mb(ours)),
                       "params_mb_fusion_bench": round(param_mb(theirs)), "process_peak_rss_mb": round(vm_hwm_mb()),
                       "times_ms": {label: [round(1e3 * t, 1) for t in v] for label, v in times.items()}}
                rows.append(row)
                print({k: v for k, v in row.items() if k != "times_ms"}, flush=True)
        del ours, theirs, models, outputs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank-of-router", type=int, default=8)
    parser.add_argument("--rank-of-expert", type=int, default=32)
    parser.add_argument("--max-shard-mb", type=int, default=512)
    parser.add_argument("--tmp", default=None, help="directory for the generated checkpoints (needs ~1.8 GB per layer)")
    parser.add_argument("--speed", action="store_true", help="compare upscaling and forward speed with FusionBench instead")
    parser.add_argument("--speed-layers", type=int, default=2)
    parser.add_argument("--speed-experts", type=int, default=8)
    parser.add_argument("--speed-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32, help="images per forward (50 tokens each at ViT-B/32)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = speed(args) if args.speed else streaming(args)
    out = Path(args.out or Path(__file__).parent / "results" / f"perf_smile_{'speed' if args.speed else 'streaming'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print_table(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
