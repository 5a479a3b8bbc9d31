"""Model formats other than ``save_pretrained``'s, for models whose own save would lose something.

A format names a test (``claims``) and a writer; plugin.py registers ours (SMILE's, io/smile.py).
The model pools' atomic save (modelpool/atomic_save.py) writes a model in the first registered format
that claims it, else with the pool's own save, so the pools need not know any format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass(frozen=True)
class ModelFormat:
    """``claims(model)``: whether ``model`` must be saved in this format; ``write(model, directory)``
    writes it into an existing directory; ``note``: what was written and how to reload it (logged)."""

    claims: Callable[[nn.Module], bool]
    write: Callable[[nn.Module, Path], None]
    note: str


MODEL_FORMATS: list[ModelFormat] = []


def register_model_format(model_format: ModelFormat) -> None:
    """Add ``model_format`` (once) to the formats the model pools' atomic save consults."""
    if model_format not in MODEL_FORMATS:
        MODEL_FORMATS.append(model_format)


def model_format_for(model: nn.Module) -> ModelFormat | None:
    """The first registered format that claims ``model``, or None (the pool's own save applies)."""
    return next((f for f in MODEL_FORMATS if f.claims(model)), None)
