"""benchmarks/report.py: the Markdown table and plot that reproduce.py writes for a zoo."""

from __future__ import annotations

from benchmarks.report import markdown_table, write_outputs

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
