"""Which half of knowledge-aware SMILE costs accuracy: the router or the experts?

Builds plain and knowledge-aware SMILE (uniform rank k, same gate_k) with ``pave_smile.py``'s
benches, then swaps the router tensors between them and evaluates all four combinations once.
Appends the result to ``--out`` (default benchmarks/results/pave_smile/swap.json).

    OMP_NUM_THREADS=1 python benchmarks/pave_smile_swap.py --zoo minilm --k 16 --gate-k 8 --split test
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pave_smile import TinyClipBench, accuracy  # noqa: E402
from reproduce import Bench  # noqa: E402


def with_routers(experts_from, routers_from):
    """A copy of ``experts_from`` whose SmileLinear routers are those of ``routers_from``."""
    from fusion_bench_pave.smile import SmileLinear

    model = copy.deepcopy(experts_from)
    source = dict(routers_from.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, SmileLinear):
            module.router.data = source[name].router.data.clone()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=["tiny_clip", "minilm"], default="minilm")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--gate-k", type=int, default=8)
    parser.add_argument("--split", choices=["val", "test"], default="test")
    parser.add_argument("--subspace", choices=["knowledge_aware", "whitened"], default="knowledge_aware")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pave_smile" / "swap.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from fusion_bench_pave.zoo import cache_root

    torch.set_num_threads(1)
    cache = cache_root()
    bench = TinyClipBench(cache) if args.zoo == "tiny_clip" else Bench(args.zoo, cache, 40, 150)
    calibration = [f"method.covariance.cache_dir={cache / 'pave_covariance'}", "method.covariance.max_length=64",
                   f"method.covariance.num_samples={64 if args.zoo == 'tiny_clip' else 128}"]

    def build(subspace: str):
        overrides = [f"method.gate_k={args.gate_k}", f"method.k={args.k}", f"method.subspace={subspace}", *calibration]
        return bench.merge("smile_upscaling", overrides)[0]

    plain, aware = build("plain"), build(args.subspace)
    models = {"plain": plain, args.subspace: aware,
              "plain router + aware experts": with_routers(aware, plain), "aware router + plain experts": with_routers(plain, aware)}
    result = {**vars(args), "accuracy": {name: accuracy(bench.evaluate(m, args.split)) for name, m in models.items()}}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*previous, result], indent=2))
    print(json.dumps(result["accuracy"], indent=2))


if __name__ == "__main__":
    main()
