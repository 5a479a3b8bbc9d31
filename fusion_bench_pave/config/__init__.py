"""Hydra configs of fusion-bench-pave (found through the hydra_plugins search-path plugin)."""
