"""+preset=pave_ta_qwen2.5-7b_math_code: the PAVE paper's LLM math+code Task Arithmetic setting composes
to its hub pool and the official LLM protocol, and runs offline on the tiny Mistral zoo with the hub
ids swapped for local models, by the replica `benchmarks.reproduce --paper pave --replica` runs it on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench.utils import instantiate
from fusion_bench_pave.threads import fixed_threads

from conftest import REPO_ROOT, compose_fusion_bench, run_fusion_bench
from reference.paper_replicas import causal_lm_overrides

PRESET = "pave_ta_qwen2.5-7b_math_code"
HEADER = (REPO_ROOT / "fusion_bench_pave" / "config" / "preset" / f"{PRESET}.yaml").read_text()


def test_preset_composes_to_the_paper_setting_on_the_closest_pool():
    cfg = compose_fusion_bench([f"+preset={PRESET}"])
    assert cfg.method._target_ == "fusion_bench_pave.pave.causal_lm_algorithm.PAVECausalLM"
    assert cfg.method.merger._target_ == "fusion_bench.method.TaskArithmeticAlgorithm" and cfg.method.merger.scaling_factor == 1.0
    assert cfg.method.rho == 4089 / 4096 and cfg.method.allocation == "uniform"
    assert (cfg.method.eps0, cfg.method.eps_tol, cfg.method.num_rows, cfg.method.calibration_padding) == (0.01, 0.01, 512, "max_length")
    assert (cfg.method.num_samples, cfg.method.sample_order, cfg.method.mask_padding) == (1, "first", False)  # the first text, padding rows in
    assert dict(cfg.modelpool.models) == {"_pretrained_": "Qwen/Qwen2.5-7B", "math": "Qwen/Qwen2.5-Math-7B",
                                          "code": "Qwen/Qwen2.5-Coder-7B"}
    assert cfg.modelpool._target_ == "fusion_bench_pave.modelpool.CausalLMPool"
    assert list(cfg.taskpool.tasks) == ["gsm8k"]
    assert "override /taskpool: LMEvalHarnessTaskPool/lm_eval" in HEADER and f"fusion_bench +preset={PRESET}" in HEADER
    assert "Llama-2-7B" in HEADER  # says what differs from the paper


def tiny_overrides(zoo: Path, root: Path) -> list[str]:
    """The preset with the hub ids swapped for the tiny Mistral zoo (math: sentiment, code: topic) by the
    overrides `benchmarks.reproduce --paper pave --replica` runs it with; the merge goes to ``root/merged``."""
    overrides = causal_lm_overrides(zoo, root, compose_fusion_bench([f"+preset={PRESET}"]))
    assert overrides[2:5] == [f"++modelpool.models.math={zoo}/models/sentiment", f"++modelpool.models.code={zoo}/models/topic",
                              f"++method.calibration_datasets.math={zoo}/data/sentiment/train"]
    return [f"+preset={PRESET}", *overrides]


@pytest.mark.slow
def test_preset_runs_offline_on_the_tiny_replica(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # bit-equal across processes at one thread each
    zoo = tiny_zoo("mistral")
    run_fusion_bench([*tiny_overrides(zoo, tmp_path), f"path.log_dir={tmp_path / 'logs'}", "print_config=false"], cwd=REPO_ROOT)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    cfg = compose_fusion_bench(tiny_overrides(zoo, tmp_path / "api"))
    with fixed_threads(1):
        api = instantiate(cfg.method, _recursive_=False).run(instantiate(cfg.modelpool))
    a, b = merged.state_dict(), api.state_dict()
    assert a.keys() == b.keys() and not [key for key in a if not torch.equal(a[key], b[key])]
    assert (tmp_path / "logs" / "program_report.json").is_file()
