"""GPU check: correctness of statistics collection, purification and SMILE on a device against CPU
float64 references, then timings at GPU sizes beside their irreducible products (the floor).

One step per process (`gpu_check.sh` runs each under its own timeout):
    python benchmarks/gpu_check.py STEP --device cuda --out DIR     # writes DIR/steps/STEP.json
    python benchmarks/gpu_check.py report --out DIR                 # table + DIR/gpu_check.json
`--device cpu --small` runs the same code at tiny sizes to exercise the plumbing without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from fusion_bench_pave.pave.covariance import add_gram_, collect_covariance, symmetrize_
from fusion_bench_pave.pave.purification import PurifySettings
from fusion_bench_pave.pave.purify import context_eigh, purify_weight, remove_subspace
from fusion_bench_pave.pave.regularize import regularize
from fusion_bench_pave.smile.decompose import smile_tensors
from fusion_bench_pave.smile.linear import SmileLinear

RHO = 63 / 64  # kept fraction of the rank in the purification timings
# PAVE's defaults: doubling rule from eps0 until the inverse check passes
REG = PurifySettings()

# Tolerances (relative Frobenius error against CPU float64):
# - covariance: both sides sum the same float64 products of the same float32 inputs; only the
#   summation order differs (blocked GEMMs on the device), ~1e-16 * sqrt(rows) => 1e-12 is generous.
# - purification: the accuracy target, 1e-6 per layer against the float64 SVD reference; the
#   result is stored in float32, whose rounding alone is ~6e-8.
# - SMILE: a float32 forward through a float32 full-rank SVD of dW; reconstruction and GEMM rounding
#   are a few float32 ulps times sqrt(width) relative to the output (~1e-6), so 1e-5.
TOL = {"covariance": 1e-12, "purification": 1e-6, "smile": 1e-5}


def rel_err(value: Tensor, reference: Tensor) -> float:
    """||value - reference||_F / ||reference||_F, computed in float64 on the CPU."""
    value, reference = value.detach().cpu().double(), reference.detach().cpu().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of `fn` after `warmup` untimed calls, synchronizing the device around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_cov(rows: int, width: int, device: torch.device, seed: int) -> Tensor:
    """A float64 covariance X^T X / N of anisotropic float32 rows (decaying column scales)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, width)
    x = (torch.randn(rows, width, generator=g) * scale).to(device)
    x64 = x.double()
    return x64.T @ x64 / rows


def rank_at(rho: float, weight: Tensor) -> int:
    return max(1, math.ceil(rho * min(weight.shape)))


# ---------------------------------------------------------------- correctness


def check_covariance(device: torch.device, small: bool) -> list[dict]:
    """add_gram_/symmetrize_ and collect_covariance (two Linears sharing an input, token mask)."""
    width, rows = (48, 300) if small else (768, 4096)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g)
    reference = x.double().T @ x.double()
    acc = torch.zeros(width, width, dtype=torch.float64, device=device)
    for chunk in x.to(device).split(rows // 4 + 1):
        add_gram_(acc, chunk.double(), block=16 if small else 256)
    symmetrize_(acc)
    results = [{"step": "covariance add_gram_", "shape": f"{rows}x{width}", "error": rel_err(acc, reference)}]

    class Pair(nn.Module):  # q and k read the same tensor: one shared sum
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(width, 8), nn.Linear(width, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.q(x) + self.k(x)

    model = Pair().to(device)
    batch = x[: rows // 2].reshape(-1, 10, width) if (rows // 2) % 10 == 0 else x[:200].reshape(-1, 10, width)
    mask = torch.rand(batch.shape[:2], generator=g) > 0.3
    stats = collect_covariance(model, [({"x": batch.to(device)}, mask.to(device))])
    kept = batch[mask].double()
    results.append({
        "step": "covariance collector (masked)",
        "shape": f"{kept.shape[0]}x{width}",
        "error": rel_err(stats.covariance("k"), kept.T @ kept / kept.shape[0]),
    })
    for r in results:
        r["tolerance"] = TOL["covariance"]
    return results


def reference_purified(weight: Tensor, cov_eps: Tensor, rank: int) -> Tensor:
    """Exact reference: float64 SVD of W C_eps on the CPU, then U_r U_r^T W."""
    w = weight.cpu().double()
    u, _, _ = torch.linalg.svd(w @ cov_eps.cpu().double(), full_matrices=False)
    return u[:, :rank] @ (u[:, :rank].T @ w)


def check_purification(device: torch.device, small: bool) -> list[dict]:
    """regularize on the device (same eps as on the CPU), then the algorithm's eigh path and the SVD
    path (`purify_weight`) against the float64 reference, tall and wide layers."""
    shapes = [(24, 16), (16, 40)] if small else [(768, 768), (3072, 768), (768, 3072)]
    results = []
    for i, (out, inp) in enumerate(shapes):
        g = torch.Generator().manual_seed(10 + i)
        weight = torch.randn(out, inp, generator=g) / inp**0.5
        cov = random_cov(2 * inp, inp, torch.device("cpu"), seed=20 + i)
        cov_eps_cpu, eps_cpu = regularize(cov, REG.regularization, REG.eps0, REG.eps_tol, REG.relative_alpha)
        cov_eps, eps = regularize(cov.to(device), REG.regularization, REG.eps0, REG.eps_tol, REG.relative_alpha)
        rank = rank_at(0.5, weight)  # a mid rank: a generic gap, many components dropped
        reference = reference_purified(weight, cov_eps_cpu, rank)
        w = weight.to(device)
        u, _ = context_eigh(w, cov_eps)
        eigh_path = remove_subspace(w, u[:, rank:])
        shape = f"{out}x{inp} r={rank}"
        results += [
            {"step": "regularize eps (dev/cpu - 1)", "shape": shape, "error": abs(eps / eps_cpu - 1), "tolerance": 0.0},
            {"step": "purify eigh path", "shape": shape, "error": rel_err(eigh_path, reference), "tolerance": TOL["purification"]},
            {"step": "purify_weight (svd)", "shape": shape, "error": rel_err(purify_weight(w, cov_eps, rank), reference), "tolerance": TOL["purification"]},
        ]
    return results


def check_smile(device: torch.device, small: bool) -> list[dict]:
    """Full-rank SMILE at top-1: each token's output equals its routed expert's dense fine-tuned
    Linear (float64 on the CPU), for a tall and a wide layer."""
    shapes = [(12, 8), (8, 12)] if small else [(768, 768), (3072, 768), (768, 3072)]
    experts, tokens = 4 if small else 8, 64 if small else 2048
    results = []
    for i, (out, inp) in enumerate(shapes):
        g = torch.Generator().manual_seed(30 + i)
        w0, b0 = torch.randn(out, inp, generator=g) / inp**0.5, torch.randn(out, generator=g) * 0.1
        ws = [w0 + 0.05 * torch.randn(out, inp, generator=g) / inp**0.5 for _ in range(experts)]
        bs = [b0 + 0.01 * torch.randn(out, generator=g) for _ in range(experts)]
        k = min(out, inp)
        state = smile_tensors(w0.to(device), [w.to(device) for w in ws], b0.to(device), [b.to(device) for b in bs],
                              gate_k=1, k=k, compute_device=device)
        layer = SmileLinear(inp, out, experts, gate_k=1, k=k, top_k=1, device=device)
        layer.load_state_dict(state)
        x = torch.randn(tokens, inp, generator=g)
        with torch.no_grad():
            y = layer(x.to(device))
            _, selected = layer.routing(x.to(device))
        sel = selected[:, 0].cpu()
        reference = torch.empty(tokens, out, dtype=torch.float64)
        for e in sel.unique().tolist():  # each token through its routed expert's dense Linear
            rows = sel == e
            reference[rows] = x[rows].double() @ ws[e].double().T + bs[e].double()
        results.append({
            "step": "SmileLinear top-1 vs dense",
            "shape": f"{out}x{inp} T={experts} used={int(sel.unique().numel())}",
            "error": rel_err(y, reference),
            "tolerance": TOL["smile"],
        })
    return results


# ---------------------------------------------------------------- timings


def time_covariance(device: torch.device, small: bool) -> list[dict]:
    """Float64 statistics of 8 tasks x 4096 float32 rows per width; floor: one full float64 X^T X."""
    widths, rows, tasks = ([32, 96], 256, 2) if small else ([768, 3072], 4096, 8)
    results = []
    for width in widths:
        x = torch.randn(tasks, rows, width, device=device)

        def collect() -> None:
            for t in range(tasks):
                acc = torch.zeros(width, width, dtype=torch.float64, device=device)
                add_gram_(acc, x[t].double())
                symmetrize_(acc)

        def floor() -> None:
            for t in range(tasks):
                xt = x[t].double()
                xt.T @ xt

        t_floor, t_run = timed(floor, device), timed(collect, device)
        results.append({"step": "covariance add_gram_+sym f64", "shape": f"{tasks}x{rows}x{width}",
                        "seconds": t_run, "floor_seconds": t_floor})
    return results


def time_collection(device: torch.device, small: bool) -> list[dict]:
    """collect_covariance on a randomly initialised CLIP vision tower (ViT-B/32 config unless small)
    against a plain no-grad forward over the same batches (issue 20 target 1: <= 1.25x)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if small:
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=32, patch_size=16)
        batches, batch = 2, 4
    else:
        config = CLIPVisionConfig()  # ViT-B/32: 768 wide, 12 layers, 224 px, 50 tokens
        batches, batch = 4, 128  # 4 x 6400 tokens
    torch.manual_seed(0)
    model = CLIPVisionModel(config).to(device).eval()
    pixels = [torch.randn(batch, 3, config.image_size, config.image_size, device=device) for _ in range(batches)]

    @torch.no_grad()
    def forward() -> None:
        for p in pixels:
            model(pixel_values=p)

    def collect() -> None:
        collect_covariance(model, [({"pixel_values": p}, None) for p in pixels])

    t_floor, t_run = timed(forward, device), timed(collect, device)
    tokens = batch * ((config.image_size // config.patch_size) ** 2 + 1)
    return [{"step": "collect_covariance CLIP-ViT f64", "shape": f"{batches}x{tokens} tok, {config.num_hidden_layers} layers",
             "seconds": t_run, "floor_seconds": t_floor, "floor": "no-grad forward"}]


def purification_timings(shapes: list[tuple[int, int]], label: str, device: torch.device, svd: bool) -> list[dict]:
    results = []
    for i, (out, inp) in enumerate(shapes):
        weight = torch.randn(out, inp, device=device) / inp**0.5
        cov = random_cov(2 * inp, inp, device, seed=40 + i)
        rank = rank_at(RHO, weight)

        def run() -> None:
            cov_eps, _ = regularize(cov, REG.regularization, REG.eps0, REG.eps_tol, REG.relative_alpha)
            dropped, _ = context_eigh(weight, cov_eps, rank)  # U's columns rank.. only, as purification forms them
            remove_subspace(weight, dropped)

        def floor() -> None:  # the irreducible products: W C_eps and the Gram of the smaller side
            m = weight.double() @ cov
            m @ m.T if out <= inp else m.T @ m

        t_floor = timed(floor, device)
        shape = f"{label} {out}x{inp} r={rank}"
        results.append({"step": "purify (reg+eigh+proj)", "shape": shape, "seconds": timed(run, device, repeats=2), "floor_seconds": t_floor})
        if svd:
            cov_eps, _ = regularize(cov, REG.regularization, REG.eps0, REG.eps_tol, REG.relative_alpha)
            results.append({"step": "purify_weight (svd, info)", "shape": shape,
                            "seconds": timed(lambda: purify_weight(weight, cov_eps, rank), device, repeats=1),
                            "floor_seconds": t_floor})
    return results


def time_purify_vit(device: torch.device, small: bool) -> list[dict]:
    shapes = [(24, 24), (96, 24), (24, 96)] if small else [(768, 768), (3072, 768), (768, 3072)]
    return purification_timings(shapes, "ViT-B/32", device, svd=True)


def time_purify_mistral(device: torch.device, small: bool) -> list[dict]:
    shapes = [(64, 64), (224, 64)] if small else [(4096, 4096), (14336, 4096)]
    return purification_timings(shapes, "Mistral-7B", device, svd=False)


def time_smile(device: torch.device, small: bool) -> list[dict]:
    """Decompose (8 experts, smile_upscaling.yaml's gate_k=1, k=128) and SmileLinear forward vs the
    dense Linear forward on a 256x50 token batch."""
    shapes = [(24, 24), (96, 24), (24, 96)] if small else [(768, 768), (3072, 768), (768, 3072)]
    experts, k, batch = (4, 8, (4, 5)) if small else (8, 128, (256, 50))
    results = []
    for out, inp in shapes:
        w0, b0 = torch.randn(out, inp, device=device) / inp**0.5, torch.zeros(out, device=device)
        ws = [w0 + 0.05 * torch.randn_like(w0) / inp**0.5 for _ in range(experts)]
        bs = [b0 + 0.01 * torch.randn_like(b0) for _ in range(experts)]
        state: dict = {}

        def decompose() -> None:
            state.update(smile_tensors(w0, ws, b0, bs, gate_k=1, k=k, compute_device=device))

        t_dec = timed(decompose, device, repeats=1)
        layer = SmileLinear(inp, out, experts, gate_k=1, k=k, device=device)
        layer.load_state_dict(state)
        dense = nn.Linear(inp, out, device=device)
        x = torch.randn(*batch, inp, device=device)
        with torch.no_grad():
            t_dense = timed(lambda: dense(x), device, repeats=5)
            t_smile = timed(lambda: layer(x), device, repeats=5)
        shape = f"{out}x{inp} T={experts} k={k}"
        results += [
            {"step": "SMILE decompose", "shape": shape, "seconds": t_dec},
            {"step": "SmileLinear forward", "shape": f"{shape} x{tuple(batch)}", "seconds": t_smile,
             "floor_seconds": t_dense, "floor": "dense Linear forward"},
        ]
    return results


def pave_end_to_end(device: torch.device, small: bool) -> list[dict]:
    """PAVE + TA on the tests' tiny CLIP pool with its Fabric on `device` (statistics collected there,
    purified on the CPU) against the same run on the CPU: same ranks, merged weights within the
    purification tolerance (the covariance sums differ only in summation order)."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root), str(root / "tests")]  # reference/ and the tests' tiny pools
    from lightning import Fabric
    from pave_helpers import make_pool

    from fusion_bench_pave.pave import PAVE

    runs = {}
    for where in ("cpu", device.type):
        algorithm = PAVE(merger={"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3},
                         rho=0.75, num_samples=12, batch_size=4, eps0=0.01)
        algorithm.fabric = Fabric(accelerator=where, devices=1)
        start = time.perf_counter()
        result = algorithm.run(make_pool("clip"))
        runs[where] = (result["model"].state_dict(), algorithm.extras["ranks"], time.perf_counter() - start)
    (cpu, cpu_ranks, _), (dev, dev_ranks, seconds) = runs["cpu"], runs[device.type]
    error = max(rel_err(dev[key], value) for key, value in cpu.items() if value.is_floating_point())
    same_ranks = dev_ranks == cpu_ranks
    return [{"step": "PAVE end to end (tiny CLIP, TA)", "shape": "-", "error": error if same_ranks else math.inf,
             "tolerance": TOL["purification"], "seconds": seconds, "ranks_equal": same_ranks}]


STEPS: dict[str, Callable[[torch.device, bool], list[dict]]] = {
    "check_covariance": check_covariance,
    "check_purification": check_purification,
    "check_smile": check_smile,
    "time_covariance": time_covariance,
    "time_collection": time_collection,
    "time_purify_vit": time_purify_vit,
    "time_purify_mistral": time_purify_mistral,
    "time_smile": time_smile,
    "pave_end_to_end": pave_end_to_end,
}


def run_step(name: str, device: str, small: bool, out: Path) -> int:
    """Run one step, write out/steps/<name>.json (rows or the error), return 0 if every row passes."""
    record: dict = {"step": name, "device": device, "small": small}
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available (torch.cuda.is_available() is False); run with --device cpu --small")
        rows = STEPS[name](dev, small)
        for row in rows:
            if "tolerance" in row:
                row["passed"] = bool(row["error"] <= row["tolerance"])
            if "floor_seconds" in row:
                row["ratio"] = row["seconds"] / row["floor_seconds"]
        record["rows"] = rows
        record["passed"] = all(row.get("passed", True) for row in rows)
    except Exception as error:  # recorded, never fatal: the shell runs every step
        traceback.print_exc()
        record["error"] = f"{type(error).__name__}: {error}"
        record["passed"] = False
    (out / "steps").mkdir(parents=True, exist_ok=True)
    (out / "steps" / f"{name}.json").write_text(json.dumps(record, indent=1))
    for row in record.get("rows", []):
        print(json.dumps(row))
    return 0 if record["passed"] else 1


def report(out: Path, statuses: dict[str, str]) -> None:
    """Merge out/steps/*.json (plus the shell's per-step exit statuses) into gpu_check.json and print
    one table."""
    steps = {}
    for name in STEPS:
        path = out / "steps" / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {"step": name, "passed": False, "error": "no result (timeout or crash)"}
        record["status"] = statuses.get(name, "not run")
        steps[name] = record
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "steps": steps}, indent=1))
    print(f"{'step':<34} {'shape':<42} {'error/tol':>20} {'seconds':>10} {'ratio':>8}  result")
    for name, record in steps.items():
        print(f"== {name}: {record['status']}" + (f" -- {record['error']}" if "error" in record else ""))
        for row in record.get("rows", []):
            err = f"{row['error']:.1e}/{row['tolerance']:.0e}" if "error" in row else ""
            sec = f"{row['seconds']:.4f}" if "seconds" in row else ""
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
            result = row.get("skipped") or {True: "pass", False: "FAIL", None: "-"}[row.get("passed")]
            print(f"{row['step']:<34} {row['shape']:<42} {err:>20} {sec:>10} {ratio:>8}  {result}")
    failed = [n for n, r in steps.items() if not r["passed"]]
    print(f"\n{len(steps) - len(failed)}/{len(steps)} steps passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"wrote {out / 'gpu_check.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=[*STEPS, "report", "list"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes (plumbing check on CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--status", action="append", default=[], help="NAME=STATUS from the shell (report)")
    args = parser.parse_args(argv)
    if args.step == "list":
        print(" ".join(STEPS))
        return 0
    if args.step == "report":
        report(args.out, dict(s.split("=", 1) for s in args.status))
        return 0
    return run_step(args.step, args.device, args.small, args.out)


if __name__ == "__main__":
    sys.exit(main())
