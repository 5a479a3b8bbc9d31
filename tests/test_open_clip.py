"""open_clip models (the PAVE paper's ViT checkpoints) through FusionBench's OpenCLIPVisionModelPool:
the pool imports on Python 3.11, PAVE reproduces Task Arithmetic at rho=1 and purifies the MLP only
by default (nn.MultiheadAttention named, as plain task vectors) or the attention too, its covariances
match a manual computation, and SMILE upscales the MLP, reproduces a fine-tuned model at full rank and
saves and reloads. Tiny encoders are built locally (nothing downloaded)."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusion_bench_pave.plugin  # noqa: F401  (compat repair: typing.override on Python 3.11)
from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool.openclip_vision import OpenCLIPVisionModelPool
from fusion_bench_pave.io.smile import load_smile_model, save_smile_model
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.calibration import ImageTransform
from fusion_bench_pave.pave.covariance import collect_covariance
from fusion_bench_pave.smile import upscale_model  # noqa: E402
from pave_helpers import image_dataset  # noqa: E402
from reference.tiny_models import noisy_copies, open_clip_encoder, perturbed  # noqa: E402

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
BLOCKS = [f"model.visual.transformer.resblocks.{i}" for i in range(2)]
MLP = [f"{block}.mlp.{name}" for block in BLOCKS for name in ("c_fc", "c_proj")]
ATTENTION = [f"{block}.attn.{name}" for block in BLOCKS for name in ("in_proj_q", "in_proj_k", "in_proj_v", "out_proj")]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, nn.Module]:
    """The pretrained encoder and three perturbed copies; TRAIN gets each task's train split config (a
    dataset saved on disk, which the pool instantiates)."""
    base = open_clip_encoder()
    models = {"_pretrained_": base, **{f"task{i}": perturbed(base, 100 + i) for i in range(3)}}
    for i in range(3):
        path = tmp_path_factory.mktemp("data") / f"task{i}"
        image_dataset(12, 200 + i).save_to_disk(str(path))
        TRAIN[f"task{i}"] = {"_target_": "datasets.load_from_disk", "dataset_path": str(path)}
    return models


TRAIN: dict[str, dict] = {}


def pool(models: dict[str, nn.Module]) -> OpenCLIPVisionModelPool:
    return OpenCLIPVisionModelPool({name: copy.deepcopy(model) for name, model in models.items()}, train_datasets=TRAIN)


def pave(**kwargs) -> PAVE:
    return PAVE(merger=TA, **{"rho": 1.0, "num_samples": 12, "batch_size": 4, "eps0": 0.01, **kwargs})


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return (model["model"] if isinstance(model, dict) else model).state_dict()


def test_the_pool_imports_on_this_python_in_a_fresh_interpreter():
    code = ("import fusion_bench_pave.plugin; from fusion_bench.modelpool import OpenCLIPVisionModelPool; "
            "from fusion_bench.taskpool import OpenCLIPVisionModelTaskPool; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_calibration_uses_the_deterministic_val_preprocess(family):
    from fusion_bench_pave.pave.calibration import load_preprocessor, preprocessor_fingerprint

    preprocessor = load_preprocessor(pool(family))
    assert isinstance(preprocessor, ImageTransform)
    assert preprocessor.transform is not None and "RandomResizedCrop" not in repr(preprocessor.transform)
    assert preprocessor_fingerprint(preprocessor) == preprocessor_fingerprint(ImageTransform(open_clip_encoder().val_preprocess))
    assert preprocessor_fingerprint(preprocessor) != preprocessor_fingerprint(ImageTransform(open_clip_encoder().train_preprocess))


@pytest.mark.parametrize("purify_attention", [False, True])
def test_rho_one_reproduces_task_arithmetic_bit_for_bit(family, purify_attention):
    merged = state(pave(purify_attention=purify_attention).run(pool(family)))
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool(family)).state_dict()
    assert merged.keys() == oracle.keys()
    assert all(torch.equal(merged[key], oracle[key]) for key in oracle)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {key for key in a if not torch.equal(a[key], b[key])}


def test_mlp_only_by_default_attention_named_and_left_as_task_vectors(family, caplog):
    algorithm = pave(rho=0.75)
    with caplog.at_level(logging.WARNING):
        merged = state(algorithm.run(pool(family)))
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool(family)).state_dict()
    assert sorted(algorithm.extras["full_ranks"]) == sorted(MLP)
    assert changed(merged, oracle) == {f"{layer}.weight" for layer in MLP}  # attention: plain task vectors
    unpurified = algorithm.extras["unpurified"]
    assert "MultiheadAttention x2 (model.visual.transformer.resblocks.0.attn" in unpurified
    assert "NonDynamicallyQuantizableLinear x2 (model.visual.transformer.resblocks.0.attn.out_proj" in unpurified
    assert any("purify_attention=true purifies" in r.message and "MultiheadAttention x2" in r.message for r in caplog.records)


def test_purify_attention_purifies_the_packed_qkv_and_out_proj(family, caplog):
    algorithm = pave(rho=0.75, purify_attention=True)
    with caplog.at_level(logging.WARNING):
        merged = state(algorithm.run(pool(family)))
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool(family)).state_dict()
    assert sorted(algorithm.extras["full_ranks"]) == sorted(MLP + ATTENTION)
    assert all(algorithm.extras["full_ranks"][layer] == 32 for layer in ATTENTION)
    assert changed(merged, oracle) == {f"{layer}.weight" for layer in MLP} | {
        f"{block}.attn.{name}" for block in BLOCKS for name in ("in_proj_weight", "out_proj.weight")}
    for task, ranks in algorithm.extras["ranks"].items():
        assert any(ranks[layer] < 32 for layer in ATTENTION), task
    assert "MultiheadAttention" not in algorithm.extras["unpurified"]
    assert "Conv2d x1 (model.visual.conv1)" in algorithm.extras["unpurified"]  # the patch embedding stays named


def test_a_statistics_directory_serves_the_attention_only_if_collected_with_it(family, tmp_path):
    from fusion_bench_pave.pave import PAVEStatistics

    collection = {"num_samples": 12, "batch_size": 4}
    for attention in (False, True):
        PAVEStatistics(output_dir=str(tmp_path / f"{attention}"), purify_attention=attention, **collection).run(pool(family))
    with pytest.raises(ValueError, match=r"task 'task0': purify_attention=true needs the inputs of nn.MultiheadAttention"):
        pave(rho=0.75, purify_attention=True, statistics=str(tmp_path / "False")).run(pool(family))
    for attention in (False, True):
        stored = pave(rho=0.75, purify_attention=attention, statistics=str(tmp_path / "True"))
        collected = pave(rho=0.75, purify_attention=attention, cache_dir=None)
        a, b = state(stored.run(pool(family))), state(collected.run(pool(family)))
        assert stored.extras["ranks"] == collected.extras["ranks"]
        assert all(torch.equal(a[key], b[key]) for key in a), attention  # the same statistics, read back


def test_statistics_of_the_attention_match_a_manual_computation(family):
    encoder = family["task0"]
    pixels = torch.stack([encoder.val_preprocess(image) for image in image_dataset(6, 7)["image"]])
    batches = [((pixels[:3],), None), ((pixels[3:],), None)]
    block = encoder.model.visual.transformer.resblocks[1]
    inputs = []  # the MHA's input in the collection's own forwards (the fused fast path rounds otherwise)
    handle = block.ln_1.register_forward_hook(lambda module, args, output: inputs.append(output))
    stats = collect_covariance(encoder, batches, attention=True)
    handle.remove()
    x = torch.cat(inputs).double()  # [batch, tokens, d]: the MHA's query, key and value
    mha = block.attn
    q, k, v = F.linear(x, mha.in_proj_weight.double(), mha.in_proj_bias.double()).chunk(3, dim=-1)
    heads = lambda t: t.unflatten(-1, (mha.num_heads, mha.head_dim)).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / mha.head_dim**0.5, dim=-1)
    z = (weights @ heads(v)).transpose(1, 2).flatten(2)  # concatenated heads, before out_proj
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    name = BLOCKS[1]
    expected_in, expected_out = rows(x).T @ rows(x) / rows(x).shape[0], rows(z).T @ rows(z) / rows(z).shape[0]
    assert stats.count[stats.input_of[f"{name}.attn.out_proj"]] == 6 * 17  # 16 patches + the class token
    # the input is the very tensor (float64 sums in another order); the attention output went through
    # float32 kernels, against a float64 reference: float32 rounding of a 32-wide attention
    torch.testing.assert_close(stats.covariance(f"{name}.attn.in_proj_v"), expected_in, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.covariance(f"{name}.attn.out_proj"), expected_out, rtol=1e-5, atol=1e-6)


def test_smile_upscales_the_mlp_and_names_the_attention_it_keeps_pretrained(family, caplog):
    finetuned = [family[f"task{i}"] for i in range(3)]
    with caplog.at_level(logging.WARNING):
        _, report = upscale_model(copy.deepcopy(family["_pretrained_"]), finetuned, gate_k=2, k=8, progress=False)
    assert report.upscaled == MLP
    attention = {f"{block}.attn": "MultiheadAttention" for block in BLOCKS}
    attention |= {f"{block}.attn.out_proj": "NonDynamicallyQuantizableLinear" for block in BLOCKS}
    assert attention.items() <= report.kept_pretrained.items()
    assert any("PRETRAINED weights" in r.message and "MultiheadAttention x2" in r.message for r in caplog.records)


def test_smile_at_full_rank_reproduces_the_finetuned_model_and_reloads(family, tmp_path):
    base = family["_pretrained_"]
    finetuned = noisy_copies(base, 1, only=r".*mlp\.c_(fc|proj)\.(weight|bias)")  # SMILE's layers only
    model, report = upscale_model(copy.deepcopy(base), finetuned, gate_k=1, k=0, top_k=1, progress=False)
    assert report.upscaled == MLP and report.kept_pretrained == {}
    pixels = torch.stack([base.val_preprocess(image) for image in image_dataset(4, 9)["image"]])
    with torch.no_grad():
        # one dense expert: W0 x + (W_ft - W0) x in float32, the fine-tuned map up to two roundings
        outputs = model(pixels)
        torch.testing.assert_close(outputs, finetuned[0](pixels), rtol=1e-5, atol=1e-5)
        save_smile_model(model, tmp_path / "smile")
        again = load_smile_model(open_clip_encoder(), tmp_path / "smile")
        assert torch.equal(again(pixels), outputs)
    assert state(again).keys() == state(model).keys()
    assert all(torch.equal(value, state(again)[key]) for key, value in state(model).items())
