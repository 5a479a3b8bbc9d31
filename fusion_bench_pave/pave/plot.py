"""Heatmap of the kept-rank ratio r/R per (task, layer)."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fusion_bench_pave.io.atomic import atomic_file  # noqa: E402


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
    try:
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
