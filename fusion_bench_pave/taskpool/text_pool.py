"""Set-up shared by our text task pools: the per-task settings check and the tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig

from fusion_bench.utils import instantiate


def check_every_task_has(field: str, entries: Iterable[str], test_datasets: Iterable[str]) -> None:
    """Fail at construction, not mid-evaluation, when a test task lacks its entry in ``field``."""
    missing = set(test_datasets) - set(entries)
    if missing:
        raise ValueError(f"{field} has no entry for test task(s) {sorted(missing)}")


def load_tokenizer(tokenizer: str | DictConfig | dict[str, Any]):
    """``AutoTokenizer.from_pretrained`` for a path, ``instantiate`` for a config."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    return instantiate(tokenizer)
