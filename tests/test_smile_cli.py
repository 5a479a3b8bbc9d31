"""`fusion_bench method=smile_upscaling / smile_mistral_upscaling` end to end on the tiny offline pools."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench.utils import instantiate
from fusion_bench_pave.smile.algorithm import SmileMistralUpscalingAlgorithm, SmileUpscalingAlgorithm
from fusion_bench_pave.threads import fixed_threads

from conftest import REPO_ROOT, compose_fusion_bench, run_fusion_bench


def accuracies(report: dict) -> dict[str, float]:
    return {task: r["accuracy"] for task, r in report.items() if isinstance(r, dict) and "accuracy" in r}


def test_our_configs_win_the_names():
    assert compose_fusion_bench(["method=smile_upscaling"]).method._target_ == "fusion_bench_pave.smile.algorithm.SmileUpscalingAlgorithm"
    mistral = compose_fusion_bench(["method=smile_mistral_upscaling"]).method
    assert mistral._target_ == "fusion_bench_pave.smile.algorithm.SmileMistralUpscalingAlgorithm"
    assert compose_fusion_bench(["method=smile_upscaling/smile_upscaling"]).method._target_ == "fusion_bench.method.SmileUpscalingAlgorithm"


@pytest.mark.slow
def test_smile_upscaling_cli_on_tiny_clip_matches_fusion_bench(tmp_path):
    from fusion_bench.method import SmileUpscalingAlgorithm as FusionBenchSmile

    log_dir, saved = tmp_path / "logs", tmp_path / "smile"
    run_fusion_bench(["method=smile_upscaling", "method.gate_k=4", "method.k=8", f"method.model_path={saved}",
                      "modelpool=tiny_clip", "taskpool=tiny_clip", f"path.log_dir={log_dir}", "print_config=false"], cwd=REPO_ROOT)
    report = accuracies(json.loads((log_dir / "program_report.json").read_text()))
    cfg = compose_fusion_bench(["modelpool=tiny_clip", "taskpool=tiny_clip"])
    pool, taskpool = instantiate(cfg.modelpool), instantiate(cfg.taskpool)
    reloaded = SmileUpscalingAlgorithm(gate_k=4, k=8, model_path=str(saved)).run(pool).eval()  # cache hit
    theirs = FusionBenchSmile(device="cpu", gate_k=4, k=8, top_k=1, routing_use_diff=True, average_experts=False).run(pool).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).last_hidden_state, theirs(pixel_values=x).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert accuracies(taskpool.evaluate(reloaded)) == pytest.approx(report, abs=1e-9)
    # FusionBench's SMILE is another code path, equal to ours within 1e-5 (above): an example whose top two
    # class scores are closer than that may flip, so one such example per task (of 64) is allowed
    assert accuracies(taskpool.evaluate(theirs)) == pytest.approx(report, abs=1 / 64 + 1e-9)
    pretrained = accuracies(taskpool.evaluate(pool.load_pretrained_model()))
    assert report["average"] > pretrained["average"] + 0.1


@pytest.mark.slow
def test_smile_upscaling_cli_on_tiny_t5(tmp_path):
    log_dir = tmp_path / "logs"
    run_fusion_bench(["method=smile_upscaling", "method.gate_k=4", "method.k=8", "modelpool=tiny_t5", "taskpool=tiny_t5",
                      f"path.log_dir={log_dir}", "print_config=false"], cwd=REPO_ROOT)
    report = accuracies(json.loads((log_dir / "program_report.json").read_text()))
    cfg = compose_fusion_bench(["modelpool=tiny_t5", "taskpool=tiny_t5"])
    pool, taskpool = instantiate(cfg.modelpool), instantiate(cfg.taskpool)
    assert accuracies(taskpool.evaluate(SmileUpscalingAlgorithm(gate_k=4, k=8).run(pool))) == pytest.approx(report, abs=1e-9)
    assert report["average"] > accuracies(taskpool.evaluate(pool.load_pretrained_model()))["average"] + 0.1


@pytest.mark.slow
def test_smile_mistral_upscaling_cli_streams_to_a_loadable_checkpoint(tmp_path, monkeypatch):
    # The CLI streams from safetensors, the comparison below upscales in memory: both run
    # write_units (smile/causal_lm/upscale.py), the same ops in the same order. The thread count must match too: MKL's
    # SVD and GEMMs give other bits at 1 and 2 threads on some CPUs (AMD EPYC; here with
    # MKL_ENABLE_INSTRUCTIONS=AVX2), so both processes run single-threaded and results are bit-equal.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    log_dir, saved = tmp_path / "logs", tmp_path / "smile"
    run_fusion_bench(["method=smile_mistral_upscaling", "method.rank_of_router=4", "method.rank_of_expert=8",
                      f"method.model_path={saved}", "modelpool=tiny_mistral", "taskpool=tiny_mistral",
                      f"path.log_dir={log_dir}", "print_config=false"], cwd=REPO_ROOT)
    report = accuracies(json.loads((log_dir / "program_report.json").read_text()))
    assert (saved / "tokenizer.json").exists()
    cfg = compose_fusion_bench(["modelpool=tiny_mistral", "taskpool=tiny_mistral"])
    pool, taskpool = instantiate(cfg.modelpool), instantiate(cfg.taskpool)
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert type(model).__name__ == "SmileMistralForCausalLM"
    with fixed_threads(1):
        assert accuracies(taskpool.evaluate(model)) == report
        in_memory = SmileMistralUpscalingAlgorithm(rank_of_router=4, rank_of_expert=8).run(
            {"_pretrained_": pool.load_pretrained_model(), **{n: pool.load_model(n) for n in pool.model_names}})
        streamed, ours = model.state_dict(), in_memory.state_dict()
        assert streamed.keys() == ours.keys() and all(torch.equal(streamed[k], ours[k]) for k in ours)
        # Equal weights do not give bit-equal logits here: the loaded tensors sit at safetensors' 8-byte
        # offsets, the in-memory ones 64-byte aligned, and MKL's GEMM rounds differently for differently
        # aligned operands (torch 2.14.1: 6e-8 on these logits, i.e. a few float32 ulps)
        ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, in_memory(ids).logits, rtol=1e-5, atol=1e-6)
    assert report["average"] > accuracies(taskpool.evaluate(pool.load_pretrained_model()))["average"] + 0.1
