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


def _accuracy(row: dict) -> float:
    return 100 * row["test"]["average"]["accuracy"]


def paired(a: list[float], b: list[float]) -> dict:
    """Mean and sample std of ``a - b`` over seeds and the two-sided paired t-test's p-value (None with
    fewer than two seeds, or when every difference is the same, where the test is undefined; equal
    counts of texts give differences equal only to rounding, hence the 1e-9 points)."""
    from statistics import mean, stdev

    from scipy.stats import ttest_rel

    diffs = [x - y for x, y in zip(a, b)]
    spread = stdev(diffs) if len(diffs) > 1 else None
    p = float(ttest_rel(a, b).pvalue) if spread is not None and spread > 1e-9 else None
    return {"mean": mean(diffs), "std": spread, "p": p, "n": len(diffs)}


def seed_summary(results: list[dict]) -> dict:
    """Over the runs of one zoo recipe at several fine-tuning seeds (one reproduce.py result each): every
    row measured in all runs with its test average (mean, std over seeds), its gap to the individual
    models, and each "<PAVE or a variant or control> + X" row paired against X."""
    from statistics import mean, stdev

    by_name = [{row["name"]: row for row in r["rows"] if "error" not in row} for r in results]
    names = [n for n in by_name[0] if all(n in runs for runs in by_name)]
    scores = {n: [_accuracy(runs[n]) for runs in by_name] for n in names}
    individual = scores.get("Individual (each on its own task)")
    rows = []
    for name in names:
        row = {"name": name, "per_seed": scores[name], "mean": mean(scores[name]),
               "std": stdev(scores[name]) if len(results) > 1 else None}
        if individual is not None and name != "Individual (each on its own task)":
            row["vs_individual"] = paired(scores[name], individual)
        base = name.partition(" + ")[2]  # "PAVE + X", "PAVE[variant] + X", "Random control + X" against X
        if base in scores:
            row["vs_base"] = paired(scores[name], scores[base])
        rows.append(row)
    return {"zoos": [r["zoo"] for r in results], "rows": rows}


def _difference(d: dict | None) -> str:
    if d is None:
        return ""
    spread = f" ± {d['std']:.1f}" if d["std"] is not None else ""
    p = f" (p={d['p']:.3f})" if d["p"] is not None else (" (one seed: no test)" if d["n"] < 2 else "")
    return f"{d['mean']:+.1f}{spread}{p}"


def seed_table(summary: dict) -> str:
    """Markdown of ``seed_summary``: test average mean ± std (%), per seed, and the paired differences."""
    lines = [f"Seeds: {', '.join(summary['zoos'])}", "",
             "| method | test avg (mean ± std) | per seed | vs individual | PAVE vs base |", "|---|---|---|---|---|"]
    for row in summary["rows"]:
        spread = f" ± {row['std']:.1f}" if row["std"] is not None else ""
        cells = [row["name"], f"{row['mean']:.1f}{spread}", " / ".join(f"{x:.1f}" for x in row["per_seed"]),
                 _difference(row.get("vs_individual")), _difference(row.get("vs_base"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
