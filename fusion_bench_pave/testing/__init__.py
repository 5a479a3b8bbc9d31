"""Offline test assets: tiny CLIP / Flan-T5 / Mistral zoos with synthetic tasks."""

from fusion_bench_pave.testing.zoo import cache_root, ensure_tiny_zoo, task_names

__all__ = ["cache_root", "ensure_tiny_zoo", "task_names"]
