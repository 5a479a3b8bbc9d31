"""Table of PAVE variants and the random control over seeds (issue 18, items 2b and 3): for each row of
``reproduce.py --validate --variant ... --random-control`` runs, validation and test averages per seed, and
each "<label> + X" row paired by seed against X and against the paper's "PAVE + X".

    python -m benchmarks.variant_summary benchmarks/results/minilm_glue/variant/minilm_glue_s0 \
        benchmarks/results/minilm_glue/variant/minilm_glue_s1 --out benchmarks/results/minilm_glue/variant
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.report import _difference, paired


def summary(results: list[dict]) -> dict:
    """Rows present in every run: val/test averages (%) per seed and paired differences (val and test)
    against the base method X and against the paper's PAVE + X."""
    by_name = [{row["name"]: row for row in r["rows"] if "error" not in row} for r in results]
    names = [n for n in by_name[0] if all(n in runs for runs in by_name)]

    def scores(name: str, split: str) -> list[float] | None:
        rows = [runs[name] for runs in by_name]
        if split == "val":
            values = [row.get("val_accuracy") for row in rows]
            return None if None in values else [100 * v for v in values]
        return [100 * row["test"]["average"]["accuracy"] for row in rows]

    out = []
    for name in names:
        row = {"name": name, "val": scores(name, "val"), "test": scores(name, "test")}
        label, _, base = name.partition(" + ")
        for key, other in (("vs_base", base), ("vs_paper_pave", f"PAVE + {base}")):
            if base and other in names and other != name:
                row[key] = {split: paired(row[split], scores(other, split))
                            for split in ("val", "test") if row[split] is not None and scores(other, split) is not None}
        out.append(row)
    return {"zoos": [r["zoo"] for r in results], "rows": out}


def table(s: dict) -> str:
    """Markdown of `summary`: per-seed val / test and the paired differences (mean ± std, p)."""
    def seeds(values):
        return " / ".join(f"{v:.1f}" for v in values) if values else ""

    def diff(row, key, split):
        return _difference(row.get(key, {}).get(split))

    lines = [f"Seeds: {', '.join(s['zoos'])}", "",
             "| method | val avg per seed | test avg per seed | val vs base | test vs base | val vs paper PAVE | test vs paper PAVE |",
             "|---|---|---|---|---|---|---|"]
    for row in s["rows"]:
        lines.append("| " + " | ".join([row["name"], seeds(row["val"]), seeds(row["test"]),
                                         diff(row, "vs_base", "val"), diff(row, "vs_base", "test"),
                                         diff(row, "vs_paper_pave", "val"), diff(row, "vs_paper_pave", "test")]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="reproduce.py output directories (one per seed)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    s = summary([json.loads((Path(run) / "results.json").read_text()) for run in args.runs])
    out = Path(args.out)
    (out / "variants.json").write_text(json.dumps(s, indent=2))
    (out / "variants.md").write_text(table(s))
    print(table(s))


if __name__ == "__main__":
    main()
