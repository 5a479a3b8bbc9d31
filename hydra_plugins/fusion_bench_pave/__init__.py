"""Hydra plugins of fusion-bench-pave (discovered through the hydra_plugins namespace)."""
