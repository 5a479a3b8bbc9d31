"""benchmarks/report.py: the Markdown table and plot that reproduce.py writes for a zoo."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.report import markdown_table, paired, seed_summary, seed_table, write_outputs

RESULT = {
    "zoo": "demo",
    "tasks": ["a", "b"],
    "rows": [
        {"name": "Pretrained", "test": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.7}, "average": {"accuracy": 0.6},
                                        "model_info": {"all_params": 22_000_000}}},
        {"name": "PAVE + TIES", "chosen": ["method.merger.scaling_factor=0.6", "method.rho=0.875"],
         "val_accuracy": 0.8125, "merge_seconds": 12.4,
         "test": {"a": {"accuracy": 0.75}, "b": {"accuracy": 0.875}, "average": {"accuracy": 0.8125},
                  "model_info": {"all_params": 22_000_000}}},
        {"name": "SMILE (gate_k=2, k=8)", "error": "RuntimeError: out of memory"},
    ],
}


def test_table_has_one_line_per_measured_row_and_lists_failures():
    table = markdown_table(RESULT)
    lines = table.splitlines()
    assert lines[0] == "| method | chosen on val | val avg | test avg | a | b | params (M) | merge s |"
    assert lines[2] == "| Pretrained |  |  | **60.0** | 50.0 | 70.0 | 22.0 |  |"
    assert lines[3] == "| PAVE + TIES | scaling_factor=0.6, rho=0.875 | 81.2 | **81.2** | 75.0 | 87.5 | 22.0 | 12 |"
    assert "FAILED: SMILE (gate_k=2, k=8): RuntimeError: out of memory" in table


def test_outputs_are_written(tmp_path):
    write_outputs(RESULT, tmp_path)
    assert (tmp_path / "results.md").read_text() == markdown_table(RESULT)
    assert (tmp_path / "results.json").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def _run(zoo: str, scores: dict[str, float]) -> dict:
    return {"zoo": zoo, "rows": [{"name": n, "test": {"average": {"accuracy": a}}} for n, a in scores.items()]
            + [{"name": "SMILE", "error": "RuntimeError: out of memory"}]}


SEEDS = [
    _run("s0", {"Individual (each on its own task)": 0.90, "TIES-Merging": 0.70, "PAVE + TIES-Merging": 0.72}),
    _run("s1", {"Individual (each on its own task)": 0.88, "TIES-Merging": 0.75, "PAVE + TIES-Merging": 0.76}),
    _run("s2", {"Individual (each on its own task)": 0.91, "TIES-Merging": 0.74, "PAVE + TIES-Merging": 0.77,
                "Task Arithmetic": 0.6}),
]


def test_seed_summary_pairs_each_pave_row_with_its_base_as_scipy_does():
    from scipy.stats import ttest_rel

    rows = {r["name"]: r for r in seed_summary(SEEDS)["rows"]}
    assert list(rows) == ["Individual (each on its own task)", "TIES-Merging", "PAVE + TIES-Merging"]  # in all runs
    pave, ties = rows["PAVE + TIES-Merging"], rows["TIES-Merging"]
    assert pave["per_seed"] == pytest.approx([72, 76, 77]) and pave["mean"] == pytest.approx(75)
    assert pave["std"] == pytest.approx(np.std([72, 76, 77], ddof=1))
    assert pave["vs_base"]["mean"] == pytest.approx(2) and pave["vs_base"]["std"] == pytest.approx(1)
    assert pave["vs_base"]["p"] == pytest.approx(ttest_rel([72, 76, 77], [70, 75, 74]).pvalue, rel=1e-9)
    assert ties["vs_individual"]["mean"] == pytest.approx(-50 / 3)
    assert "vs_base" not in ties and "vs_individual" not in rows["Individual (each on its own task)"]
    table = seed_table(seed_summary(SEEDS))
    p_base, p_individual = (f"{ttest_rel([72, 76, 77], b).pvalue:.3f}" for b in ([70, 75, 74], [90, 88, 91]))
    assert (f"| PAVE + TIES-Merging | 75.0 ± 2.6 | 72.0 / 76.0 / 77.0 | -14.7 ± 3.1 (p={p_individual}) "
            f"| +2.0 ± 1.0 (p={p_base}) |") in table.splitlines()


def test_one_seed_has_no_spread_and_no_test():
    row = seed_summary(SEEDS[:1])["rows"][2]
    assert row["std"] is None and row["vs_base"] == {"mean": pytest.approx(2), "std": None, "p": None, "n": 1}
    assert "+2.0 (one seed: no test)" in seed_table(seed_summary(SEEDS[:1]))


def test_differences_equal_up_to_rounding_have_no_test():
    # one more correct text out of 900 on both seeds (measured task averages): 0.111 points each,
    # equal only up to float rounding, where scipy would report p ~ 1e-13
    a, b = [82.66666666666667, 81.55555555555556], [82.55555555555557, 81.44444444444444]
    d = paired(a, b)
    assert 0 < d["std"] < 1e-9 and d["mean"] == pytest.approx(100 / 900) and d["p"] is None
