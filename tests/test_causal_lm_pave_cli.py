"""`fusion_bench method=pave_ta_causal_lm` end to end on the tiny Mistral pool, its yaml, and its refusals."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench.modelpool import BaseModelPool, CausalLMPool
from fusion_bench.utils import instantiate
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave import causal_lm_algorithm
from fusion_bench_pave.pave.causal_lm_algorithm import PAVECausalLM
from fusion_bench_pave.threads import fixed_threads

from conftest import REPO_ROOT, compose_fusion_bench, run_fusion_bench

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 1.0}
OFFICIAL_LLM = dict(rho=4089 / 4096, allocation="uniform", eps0=0.01, eps_tol=1e-2, num_samples=1, num_rows=512,
                    batch_size=1, max_length=512, mask_padding=False, calibration_padding="max_length")


def test_yaml_mirrors_the_constructor_with_the_official_llm_protocol():
    base = OmegaConf.to_container(compose_fusion_bench(["method=pave_causal_lm"]).method, resolve=False)
    parameters = inspect.signature(PAVECausalLM.__init__).parameters
    assert list(base) == ["_target_", *[p for p in parameters if p not in ("self", "kwargs")]]
    assert {key: base[key] for key in parameters if key not in ("self", "kwargs", "merger")} == {
        key: p.default for key, p in parameters.items() if key not in ("self", "kwargs", "merger")}
    assert {key: base[key] for key in OFFICIAL_LLM} == OFFICIAL_LLM
    assert compose_fusion_bench(["method=pave_ta_causal_lm"]).method.merger == TA


def tiny_pool(tiny_zoo):
    tiny_zoo("mistral")
    return instantiate(compose_fusion_bench(["modelpool=tiny_mistral"]).modelpool)


@pytest.mark.slow
def test_cli_output_loads_and_equals_the_python_api_and_the_in_memory_pave(tmp_path, tiny_zoo, monkeypatch):
    # bit-equal across processes at one thread each (MKL's kernels give other bits at other thread counts)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pool = tiny_pool(tiny_zoo)
    out, log_dir = tmp_path / "merged", tmp_path / "logs"
    run_fusion_bench(["method=pave_ta_causal_lm", "modelpool=tiny_mistral", "taskpool=tiny_mistral",
                      f"method.output_path={out}", f"path.log_dir={log_dir}", "print_config=false"], cwd=REPO_ROOT)
    merged = AutoModelForCausalLM.from_pretrained(out)
    report = json.loads((log_dir / "program_report.json").read_text())
    assert set(report) >= {"sentiment", "topic", "weather"}
    with fixed_threads(1):
        api = PAVECausalLM(merger=TA, output_path=str(tmp_path / "api")).run(pool)
        in_memory = PAVE(merger=TA, **OFFICIAL_LLM, cache_dir=None, report_extras=False).run(pool)
    for other in (api, in_memory):
        a, b = merged.state_dict(), other.state_dict()
        assert a.keys() == b.keys() and not [key for key in a if not torch.equal(a[key], b[key])]
    plain = instantiate({**TA, "_target_": "fusion_bench.method.TaskArithmeticAlgorithm"}).run(pool)
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(merged.get_parameter(key), plain.get_parameter(key))  # purification changed it


def refuses(pool, match: str, monkeypatch, **kwargs) -> None:
    """The run fails with `match` before any statistics are collected or weights read."""
    monkeypatch.setattr(causal_lm_algorithm, "pave_merge_causal_lm_checkpoints",
                        lambda *a, **k: pytest.fail("reached the merge before refusing"))
    with pytest.raises((ValueError, FileExistsError), match=match):
        PAVECausalLM(**{"merger": TA, **kwargs}).run(pool)


def test_bad_inputs_fail_before_any_work(tmp_path, tiny_zoo, monkeypatch):
    pool = tiny_pool(tiny_zoo)
    refuses(BaseModelPool({"_pretrained_": torch.nn.Linear(2, 2)}), "streams the checkpoints of a CausalLMPool; got BaseModelPool", monkeypatch)
    missing = CausalLMPool({"_pretrained_": pool.get_model_path("_pretrained_"), "math": str(tmp_path / "nowhere")}, tokenizer=None)
    refuses(missing, r"model 'math' \(.*nowhere\): no safetensors checkpoint", monkeypatch)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    refuses(pool, "out already exists; pass overwrite=true", monkeypatch, output_path=str(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    refuses(pool, "allocation='per_model': the streamed PAVE offers", monkeypatch, allocation="per_model")
    refuses(pool, "merger._target_='fusion_bench.method.SimpleAverageAlgorithm': the streamed merge offers", monkeypatch,
            merger={"_target_": "fusion_bench.method.SimpleAverageAlgorithm"})
    refuses(pool, r"purify_tasks names task\(s\) \['math'\]", monkeypatch, purify_tasks=["math"])
    refuses(pool, "rho must be in", monkeypatch, rho=1.5)
    from reference.tiny_models import gpt2

    gpt2().save_pretrained(tmp_path / "gpt2")
    other = CausalLMPool({"_pretrained_": str(tmp_path / "gpt2"), "a": str(tmp_path / "gpt2")}, tokenizer=None)
    refuses(other, "is a 'gpt2' model; the streamed PAVE runs mistral, llama, qwen2", monkeypatch)
    no_data = CausalLMPool(dict(pool._models), tokenizer=None)
    refuses(no_data, "task 'sentiment' has no calibration data", monkeypatch)
