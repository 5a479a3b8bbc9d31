"""GPT-2's transformers Conv1D layers (weight [in, out], y = x W + b) in PAVE and SMILE: FusionBench's
TA/TIES as oracles at rho = 1, an independent recomputation on the transposed weights at rho < 1,
SMILE against the naive per-token forward, and the saved SMILE model reloaded."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from pave_helpers import make_pool
from transformers.pytorch_utils import Conv1D

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.purify import purify_weight
from fusion_bench_pave.pave.regularize import regularize_doubling
from fusion_bench_pave.smile import SmileLinear, upscale_model
from fusion_bench_pave.io.smile import load_smile_model, save_smile_model
from reference.smile_forward import naive_forward
from reference.tiny_models import gpt2, noisy_copies

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
TIES = {"_target_": "fusion_bench.method.TiesMergingAlgorithm", "scaling_factor": 0.7, "threshold": 20,
        "remove_keys": [], "merge_func": "sum"}
CONV1D = r".*\.(c_attn|c_proj|c_fc)"


def pave(merger: dict, **kwargs) -> PAVE:
    return PAVE(merger=merger, **{"rho": 1.0, "num_samples": 12, "batch_size": 4, "eps0": 0.01, **kwargs})


def conv1d_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Conv1D)]


@pytest.mark.parametrize("kind", ["gpt2", "gpt2_classifier"])
@pytest.mark.parametrize("merger, oracle", [(TA, TaskArithmeticAlgorithm), (TIES, TiesMergingAlgorithm)], ids=["ta", "ties"])
def test_rho_one_is_the_merger_bit_for_bit(kind, merger, oracle):
    merged = pave(merger, report_extras=False).run(make_pool(kind))
    expected = oracle(**{k: v for k, v in merger.items() if k != "_target_"}).run(make_pool(kind)).state_dict()
    for key, value in merged.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_rho_below_one_equals_a_recomputation_on_the_transposed_weights():
    algo = pave(TA, rho=0.6)
    merged = algo.run(make_pool("gpt2"))["model"].state_dict()
    extras, fresh = algo.extras, make_pool("gpt2")
    pretrained = fresh.load_pretrained_model()
    assert sorted(extras["full_ranks"]) == sorted(conv1d_names(pretrained))  # lm_head is the head
    assert all(0 < ratio < 1 for ratio in extras["kept_ratio"].values())
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(make_pool("gpt2")).state_dict()
    for key, value in merged.items():
        if key.removesuffix(".weight") not in extras["full_ranks"]:
            assert torch.equal(value, oracle[key]), key  # biases, norms, embeddings: plain task arithmetic
    w_pre = {layer: pretrained.get_submodule(layer).weight.data.T for layer in extras["full_ranks"]}  # [out, in]
    expected = {layer: w.clone() for layer, w in w_pre.items()}
    for task in fresh.model_names:
        model = fresh.load_model(task)
        stats = algo.task_covariance(fresh, task, model)
        for layer in expected:
            cov_eps, _ = regularize_doubling(stats.covariance(layer), 0.01, 5e-2)
            tilde = purify_weight(model.get_submodule(layer).weight.data.T, cov_eps, extras["ranks"][task][layer])
            expected[layer] += 0.3 * (tilde - w_pre[layer])
    for layer in expected:
        # stored back as Conv1D's [in, out]; same ops up to the summation order of TA's state dicts
        torch.testing.assert_close(merged[f"{layer}.weight"], expected[layer].T, rtol=1e-5, atol=1e-6)
        assert merged[f"{layer}.weight"].is_contiguous()


def test_pave_warns_about_weight_matrices_it_does_not_purify(caplog):
    with caplog.at_level(logging.WARNING):
        pave(TA, report_extras=False).run(make_pool("clip", tasks=1))
    assert "Conv2d x1 (embeddings.patch_embedding)" in caplog.text


@pytest.fixture(scope="module")
def family():
    base = gpt2(classifier=True)
    return base, noisy_copies(base, 3, only=CONV1D)


@torch.no_grad()
def test_smile_conv1d_layers_equal_the_naive_forward(family):
    base, finetuned = family
    model, report = upscale_model(copy.deepcopy(base), finetuned, gate_k=2, k=4, top_k=2, progress=False)
    assert report.upscaled == conv1d_names(base) and report.heads == ["score"]
    inputs = {}
    hooks = [base.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n in report.upscaled]
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    base(input_ids=ids)
    for hook in hooks:
        hook.remove()
    for name in report.upscaled:
        layer, conv = model.get_submodule(name), base.get_submodule(name)
        assert isinstance(layer, SmileLinear) and torch.equal(layer.weight, conv.weight.T)
        x = inputs[name]
        # batched experts against the per-token formula: float32 sums over <= 4 * 32 terms, ~1e-6
        torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)
        expert = finetuned[0].get_submodule(name)  # expert 0's dW = W_ft - W0 in [out, in]
        torch.testing.assert_close(layer.expert_u[0] @ layer.expert_svh[0],
                                   _rank_k(expert.weight.T - conv.weight.T, 4), rtol=1e-4, atol=1e-5)


def _rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).float()


@torch.no_grad()
def test_saved_smile_gpt2_reloads_into_the_pretrained_architecture(family, tmp_path):
    base, finetuned = family
    model, _ = upscale_model(copy.deepcopy(base), finetuned, gate_k=2, k=4, progress=False)
    save_smile_model(model, tmp_path / "smile")
    loaded = load_smile_model(gpt2(classifier=True), tmp_path / "smile")
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_exclude_modules_and_the_purifiable_check_see_conv1d_layers():
    algo = pave(TA, rho=0.6, exclude_modules=["c_attn", "*.mlp.c_fc", "lm_head"])
    algo.run(make_pool("gpt2", tasks=2))
    assert sorted(algo.extras["full_ranks"]) == [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]
    with pytest.raises(ValueError, match=r"excludes all 9 linear layers of the model"):  # 8 Conv1D + lm_head
        pave(TA, exclude_modules=["*"]).run(make_pool("gpt2", tasks=1))
