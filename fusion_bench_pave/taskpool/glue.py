"""GLUE's splits from the hub dataset or from a local copy saved with ``Dataset.save_to_disk``."""

from __future__ import annotations

import os

import datasets


def load_glue(path: str, task: str, split: str) -> datasets.Dataset:
    """Split ``split`` of GLUE task ``task`` (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli):
    ``<path>/<task>/<split>`` if that directory exists (an offline copy), else
    ``datasets.load_dataset(path, task, split=split)`` (``path``: the hub dataset, nyu-mll/glue)."""
    local = os.path.join(path, task, split)
    if os.path.isdir(local):
        return datasets.load_from_disk(local)
    return datasets.load_dataset(path, task, split=split)
