"""Markdown table, JSON and accuracy-vs-parameters plot of a reproduce.py run."""

from __future__ import annotations

import json
from pathlib import Path


def _chosen(row: dict) -> str:
    chosen = row.get("chosen")
    if not chosen:
        return ""
    if isinstance(chosen, dict):
        return ", ".join(f"{k}={v}" for k, v in chosen.items())
    pairs = (o.split("=", 1) for o in chosen)  # "method.merger.scaling_factor=0.6" -> scaling_factor=0.6
    return ", ".join(f"{key.split('.')[-1]}={value}" for key, value in pairs)


def markdown_table(result: dict) -> str:
    """One row per method: chosen hyperparameters, validation and test accuracy (%), parameters."""
    tasks = result["tasks"]
    head = ["method", "chosen on val", "val avg", "test avg", *tasks, "params (M)", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    failed = [row for row in result["rows"] if "error" in row]
    for row in result["rows"]:
        if "error" in row:
            continue
        test = row["test"]
        val = row.get("val_accuracy")
        params = test.get("model_info", {}).get("all_params")
        cells = [
            row["name"], _chosen(row), f"{100 * val:.1f}" if val is not None else "",
            f"**{100 * test['average']['accuracy']:.1f}**",
            *(f"{100 * test[t]['accuracy']:.1f}" if t in test else "" for t in tasks),
            f"{params / 1e6:.1f}" if params else "", f"{row['merge_seconds']:.0f}" if "merge_seconds" in row else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\nFAILED: {row['name']}: {row['error']}" for row in failed]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Test accuracy against parameter count, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in result["rows"]:
        if "error" in row:
            continue
        params = row["test"].get("model_info", {}).get("all_params")
        if not params:
            continue
        acc = 100 * row["test"]["average"]["accuracy"]
        marker = "s" if row["name"].startswith("PAVE") else ("^" if row["name"].startswith("SMILE") else "o")
        ax.scatter(params / 1e6, acc, marker=marker)
        ax.annotate(row["name"], (params / 1e6, acc), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("average test accuracy (%)")
    ax.set_title(f"{result['zoo']} zoo: accuracy vs. parameter count (measured here)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown_table(result))
    plot(result, out / "accuracy_vs_params.png")
