"""The plugin is found by Hydra: compose API, CLI help and --cfg from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, compose_fusion_bench, run_fusion_bench


def test_repo_root_does_not_hijack_fusion_bench_config_dir():
    # A top-level config/ or fusion_bench_config/ next to the user would become FusionBench's
    # primary config dir ("Cannot find primary config"); ours must live inside the package.
    for name in ("config", "fusion_bench_config"):
        assert not (REPO_ROOT / name).exists()
    assert (REPO_ROOT / "fusion_bench_pave" / "config" / "modelpool" / "tiny_clip.yaml").exists()


@pytest.mark.parametrize("kind", ["clip", "t5", "mistral"])
def test_compose_finds_our_pools(kind):
    cfg = compose_fusion_bench([f"modelpool=tiny_{kind}", f"taskpool=tiny_{kind}", "method=task_arithmetic"])
    expected = {
        "clip": ("fusion_bench_pave.modelpool.CLIPVisionModelPool", "fusion_bench_pave.taskpool.CLIPVisionTaskPool"),
        "t5": ("fusion_bench_pave.modelpool.Seq2SeqLMPool", "fusion_bench_pave.taskpool.LabelWordsTaskPool"),
        "mistral": ("fusion_bench_pave.modelpool.CausalLMPool", "fusion_bench_pave.taskpool.LabelWordsTaskPool"),
    }[kind]
    assert (cfg.modelpool._target_, cfg.taskpool._target_) == expected
    assert cfg.method._target_ == "fusion_bench.method.TaskArithmeticAlgorithm"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_cli_resolves_our_configs_from_any_directory(where, tmp_path):
    cwd = REPO_ROOT if where == "repo_root" else tmp_path
    out = run_fusion_bench(["--cfg", "job", "--resolve", "modelpool=tiny_clip", "taskpool=tiny_clip"], cwd=cwd).stdout
    assert "_target_: fusion_bench_pave.taskpool.CLIPVisionTaskPool" in out
    assert f"{os.environ['FUSION_BENCH_PAVE_CACHE']}/tiny/clip-v" in out  # resolver ran: zoo path


@pytest.mark.slow
def test_cli_help_lists_our_config_groups(tmp_path):
    out = run_fusion_bench(["--help"], cwd=tmp_path).stdout
    groups = {line.split(":")[0]: line for line in out.splitlines() if ":" in line}
    for kind in ("clip", "t5", "mistral"):
        assert f"tiny_{kind}" in groups["modelpool"]
        assert f"tiny_{kind}" in groups["taskpool"]


def test_importing_the_plugin_registers_smile_causal_lms_in_a_fresh_interpreter():
    # fusion_bench imports the plugin; a pool pointing at a saved SMILE model then loads it by Auto class
    code = (
        "import fusion_bench_pave.plugin\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "for t in ('smile_mistral', 'smile_llama', 'smile_qwen2', 'smile_gemma2', 'smile_phi3'):\n"
        "    config = AutoConfig.for_model(t, vocab_size=32, hidden_size=16, intermediate_size=32,\n"
        "        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,\n"
        "        rank_of_expert=4, rank_of_router=2)\n"
        "    print(type(AutoModelForCausalLM.from_config(config)).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["SmileMistralForCausalLM", "SmileLlamaForCausalLM", "SmileQwen2ForCausalLM",
                                 "SmileGemma2ForCausalLM", "SmilePhi3ForCausalLM"]
