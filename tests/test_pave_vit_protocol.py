"""The official ViT protocol's keys (../shared/design/PAVE.md, "The official protocol"): calibration on
the first N token rows of the split in dataset order (sample_order=first, num_rows=N) and purification
of the MLP only (exclude_modules=["*.self_attn.*"] on a Hugging Face CLIP)."""

from __future__ import annotations

import pytest
import torch
from pave_helpers import make_pool

import fusion_bench_pave.plugin  # noqa: F401  (compat repair before fusion_bench imports)
from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.calibration import sample_indices
from reference.official_pave import collect_layer_inputs

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
MLP_ONLY = ["*.self_attn.*"]
TOKENS = 17  # the tiny CLIP's 32x32 images in 8x8 patches, plus the class token


def pave(**kwargs) -> PAVE:
    return PAVE(merger=TA, **{"rho": 1.0, "num_samples": 12, "batch_size": 4, "eps0": 0.01, "cache_dir": None, **kwargs})


def test_first_order_is_dataset_order_and_ignores_the_seed():
    assert sample_indices(50, 7, seed=3, task="t", order="first") == list(range(7))
    assert sample_indices(50, 7, seed=4, task="t", order="first") == list(range(7))
    assert sample_indices(50, 7, seed=3, task="t") != list(range(7))  # the default draws a random subset
    with pytest.raises(ValueError, match=r"asked for 8 calibration samples.*only 7 rows"):
        sample_indices(7, 8, seed=0, task="t", order="first")
    with pytest.raises(ValueError, match=r"sample_order must be one of \['random', 'first'\], got 'sorted'"):
        sample_indices(50, 7, seed=0, task="t", order="sorted")


@pytest.mark.parametrize("num_rows", [40, 6 * TOKENS])
def test_first_order_uses_exactly_the_first_token_rows_of_the_split(num_rows):
    """The official ViT hooks store the inputs of the unshuffled loader's batches and keep the first
    N rows; sample_order=first with num_rows=N gives that covariance (N cuts an image or not)."""
    pool = make_pool("clip")
    model = pool.load_model("task1")
    stats = pave(sample_order="first", num_rows=num_rows, seed=7).task_covariance(pool, "task1", model)
    dataset, processor = pool.load_train_dataset("task1"), pool.load_processor()
    images = [image.convert("RGB") for image in dataset.select(range(8))["image"]]  # 8 * 17 rows > N
    batches = [{"pixel_values": processor(images=images[i : i + 4], return_tensors="pt")["pixel_values"]}
               for i in (0, 4)]
    official = collect_layer_inputs(model, batches, num_rows)
    assert set(official) == set(stats.input_of)
    for layer, x in official.items():
        assert stats.count[stats.input_of[layer]] == num_rows
        x = x.double()
        # float32 products are exact in float64; only the order of the float64 sums differs
        torch.testing.assert_close(stats.covariance(layer), x.T @ x / num_rows, rtol=1e-12, atol=1e-14)
    other_seed = pave(sample_order="first", num_rows=num_rows, seed=8).task_covariance(pool, "task1", model)
    assert all(torch.equal(other_seed.xtx[k], stats.xtx[k]) for k in stats.xtx)
    drawn = pave(num_rows=num_rows, seed=7).task_covariance(pool, "task1", model)  # random order: other rows
    fc1 = next(layer for layer in stats.input_of if layer.endswith("layers.0.mlp.fc1"))
    assert not torch.allclose(drawn.covariance(fc1), stats.covariance(fc1))


def test_mlp_only_leaves_every_other_weight_to_plain_task_arithmetic_bit_for_bit():
    algo = pave(rho=0.5, exclude_modules=MLP_ONLY)
    result = algo.run(make_pool("clip"))
    merged = result["model"].state_dict()
    plain = TaskArithmeticAlgorithm(scaling_factor=0.3).run(make_pool("clip")).state_dict()
    mlp = {key for key in merged if ".mlp.fc" in key and key.endswith(".weight")}
    assert len(mlp) == 4 and any(".self_attn." in key for key in merged)  # 2 layers x fc1, fc2
    for key in merged:
        assert torch.equal(merged[key], plain[key]) != (key in mlp), key  # only the MLP weights change
    purified_layers = {layer for ranks in algo.extras["ranks"].values() for layer in ranks}
    assert purified_layers == {key.removesuffix(".weight") for key in mlp}
