"""Heatmap of the kept-rank ratio r/R per (task, layer)."""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_rank_heatmap(
    ranks: Mapping[str, Mapping[str, int]], full_ranks: Mapping[str, int], path: str
) -> str:
    """Write a PNG heatmap (tasks x layers, colour = kept rank / full rank) atomically to `path`."""
    tasks = list(ranks)
    layers = list(full_ranks)
    ratios = np.array([[ranks[t][l] / full_ranks[l] for l in layers] for t in tasks])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(layers) + 3), 0.5 * len(tasks) + 2))
    image = ax.imshow(ratios, aspect="auto", cmap="viridis", vmin=min(0.5, ratios.min()), vmax=1.0)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel(f"Linear layer (0..{len(layers) - 1}, module order)")
    ax.set_title("PAVE kept rank / full rank")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
    return path
