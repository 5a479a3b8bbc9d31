"""OmegaConf resolvers our yaml uses. ``${fbp_tiny:clip}`` is the tiny CLIP zoo's directory,
built on first use, so ``modelpool=tiny_clip`` works on a fresh machine with no set-up step."""

from __future__ import annotations

from omegaconf import OmegaConf


def _tiny_zoo(kind: str) -> str:
    from fusion_bench_pave.testing import ensure_tiny_zoo

    return str(ensure_tiny_zoo(kind))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fbp_tiny"):
        OmegaConf.register_new_resolver("fbp_tiny", _tiny_zoo, use_cache=True)
