"""Model-level SMILE upscaling: FusionBench oracle on tiny CLIP / T5, exactness, errors, save/load."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench.modelpool import BaseModelPool
from fusion_bench_pave.io.atomic import MANIFEST
from fusion_bench_pave.io.smile import save_smile_model
from fusion_bench_pave.smile import SmileLinear, upscale_model
from fusion_bench_pave.smile.algorithm import SmileUpscalingAlgorithm
from reference.tiny_models import clip_vision, noisy_copies, t5

CONFIGS = [
    dict(gate_k=4, k=8, top_k=1),
    dict(gate_k=2, k=16, top_k=2),
    dict(gate_k=1, k=0, top_k=1),
    dict(gate_k=3, k=4, top_k=3, routing_use_diff=False),
]


def fusion_bench_upscale(pretrained: nn.Module, finetuned: list[nn.Module], **kw) -> nn.Module:
    from fusion_bench.method import SmileUpscalingAlgorithm as FusionBenchSmile

    pool = BaseModelPool({"_pretrained_": copy.deepcopy(pretrained), **{f"m{i}": copy.deepcopy(m) for i, m in enumerate(finetuned)}})
    algo = FusionBenchSmile(device="cpu", full_matrices=True, routing_use_diff=kw.pop("routing_use_diff", True), average_experts=False, **kw)
    return algo.run(pool).eval()


def ours_upscale(pretrained, finetuned, **kw) -> nn.Module:
    return upscale_model(copy.deepcopy(pretrained), [copy.deepcopy(m) for m in finetuned], progress=False, **kw)[0].eval()


@pytest.fixture(scope="module")
def clip_family():
    pre = clip_vision()
    return pre, noisy_copies(pre, 3)


@pytest.fixture(scope="module")
def t5_family():
    pre = t5()
    return pre, noisy_copies(pre, 3, scale=0.05)


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_clip_equals_fusion_bench(clip_family, kw):
    pre, fts = clip_family
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours, theirs = ours_upscale(pre, fts, **kw), fusion_bench_upscale(pre, fts, **kw)
    assert sum(isinstance(m, SmileLinear) for m in ours.modules()) == 12
    with torch.no_grad():
        a, b = ours(pixel_values=x).last_hidden_state, theirs(pixel_values=x).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - pre(pixel_values=x).last_hidden_state).abs().max() > 1e-3  # the experts do something


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_t5_equals_fusion_bench(t5_family, kw):
    pre, fts = t5_family
    g = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(0, 50, (3, 9), generator=g), torch.randint(0, 50, (3, 5), generator=g)
    ours, theirs = ours_upscale(pre, fts, target_modules=[".*"], **kw), fusion_bench_upscale(pre, fts, **kw)
    assert isinstance(ours.lm_head, SmileLinear)  # a head, upscaled because target_modules names it
    with torch.no_grad():
        a, b = ours(input_ids=ids, decoder_input_ids=dec).logits, theirs(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_top1_full_rank_reproduces_each_finetuned_model(clip_family):
    pre = clip_family[0]
    ft = noisy_copies(pre, 1, only=r"(proj|fc\d)\.(weight|bias)")[0]
    model = ours_upscale(pre, [ft], gate_k=1, k=32, top_k=1)  # 32 = min(m, n) of every linear
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ft(pixel_values=x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_inputs_are_not_modified_and_only_changed_layers_are_upscaled(clip_family):
    pre = clip_family[0]
    fts = noisy_copies(pre, 2, only=r"layers\.0\.mlp")
    before = [copy.deepcopy(m.state_dict()) for m in fts]
    model, report = upscale_model(copy.deepcopy(pre), fts, gate_k=2, k=4, progress=False)
    assert report.upscaled == ["encoder.layers.0.mlp.fc1", "encoder.layers.0.mlp.fc2"] or report.upscaled == [
        "vision_model.encoder.layers.0.mlp.fc1", "vision_model.encoder.layers.0.mlp.fc2"]
    assert len(report.unchanged) == 10
    for m, sd in zip(fts, before):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


def test_target_modules_and_average_experts(clip_family):
    pre, fts = clip_family
    model, report = upscale_model(copy.deepcopy(pre), fts, gate_k=2, k=4, target_modules=[r".*mlp\.fc\d"],
                                  average_experts=True, progress=False)
    assert len(report.upscaled) == 4 and len(report.not_targeted) == 8
    assert all("mlp" in n for n in report.upscaled)
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    mean = torch.stack([m.get_submodule(name).weight for m in fts]).mean(0)
    torch.testing.assert_close(model.get_submodule(name).weight, mean)
    assert name in report.averaged


def test_errors_name_the_layer_and_the_valid_range(clip_family):
    pre, fts = clip_family
    with pytest.raises(ValueError, match=r"T=0"):
        upscale_model(copy.deepcopy(pre), [], gate_k=1, k=4, progress=False)
    untouched, broken = copy.deepcopy(pre), copy.deepcopy(fts[0])
    last_mlp = next(n for n, _ in broken.named_modules() if n.endswith("layers.1.mlp"))
    broken.get_submodule(last_mlp).fc2 = nn.Linear(64, 30)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc2: fine-tuned model 0 has weight shape \(30, 64\)"):
        upscale_model(untouched, [broken], gate_k=1, k=4, progress=False)
    assert not any(isinstance(m, SmileLinear) for m in untouched.modules())  # validated before any surgery
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj: gate_k=0 out of range \[1, 32\] for a 32x32 weight"):
        upscale_model(copy.deepcopy(pre), fts, gate_k=0, k=4, progress=False)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 3\]"):
        upscale_model(copy.deepcopy(pre), fts, gate_k=1, k=4, top_k=4, progress=False)
    with pytest.raises(ValueError, match="nothing to upscale"):
        upscale_model(copy.deepcopy(pre), [copy.deepcopy(pre)], gate_k=1, k=4, progress=False)
    with pytest.raises(ValueError, match=r"fc1: fine-tuned model 0 has weight shape \(48, 32\), pretrained has \(64, 32\)"):
        other = copy.deepcopy(pre)
        fc1 = next(n for n, _ in other.named_modules() if n.endswith("layers.0.mlp.fc1"))
        other.get_submodule(fc1.rpartition(".")[0]).fc1 = nn.Linear(32, 48)
        upscale_model(copy.deepcopy(pre), [other], gate_k=1, k=4, progress=False, target_modules=[r".*fc1"])


def test_algorithm_saves_and_reloads_identically_and_refuses_other_settings(tmp_path, clip_family):
    pre, fts = clip_family
    pool = lambda: BaseModelPool({"_pretrained_": copy.deepcopy(pre), **{f"m{i}": copy.deepcopy(m) for i, m in enumerate(fts)}})  # noqa: E731
    path = tmp_path / "smile"
    settings = dict(gate_k=2, k=4, top_k=2, average_experts=True, model_path=str(path))
    first = SmileUpscalingAlgorithm(**settings).run(pool()).eval()
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, "smile.json", "smile.safetensors", "smile_upscaling.json"]
    saved = {p.name: p.read_bytes() for p in path.iterdir()}
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"^model_path {where} holds a SMILE model built differently \(k: saved 4, requested 16\); "
                                         rf"refusing to reuse it: choose a new model_path, or delete {where} to upscale again$"):
        SmileUpscalingAlgorithm(**{**settings, "k": 16}).run(pool())
    with pytest.raises(ValueError, match=r"built differently \(average_experts: saved True, requested False\)"):
        SmileUpscalingAlgorithm(**{**settings, "average_experts": False}).run(pool())
    assert {p.name: p.read_bytes() for p in path.iterdir()} == saved  # refused requests leave the model as it was
    again = SmileUpscalingAlgorithm(**settings).run(pool()).eval()  # same settings, same models: loaded
    assert first.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in first.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(first(pixel_values=x).last_hidden_state, again(pixel_values=x).last_hidden_state)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_smile_model(first, path)


def test_algorithm_dtype(clip_family):
    pre, fts = clip_family
    model = SmileUpscalingAlgorithm(gate_k=2, k=4, dtype="bfloat16").run(
        {"_pretrained_": copy.deepcopy(pre), "a": copy.deepcopy(fts[0]), "b": copy.deepcopy(fts[1])})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
