"""Per-tensor merge functions against FusionBench's whole-vector ones; exact streaming k-th magnitude;
DARE masks reproduced from a positioned generator."""

from __future__ import annotations

import pytest
import torch
from fusion_bench.method.dare.utils import param_random_drop_
from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

from fusion_bench_pave.merging.dare import random_drop, skip_draws
from fusion_bench_pave.merging.kth_magnitude import KthMagnitude
from fusion_bench_pave.merging.ties import elect_signs, majority_sign, sign_votes, ties_merge, trim, trim_rank


def select(pieces: list[torch.Tensor], k: int) -> torch.Tensor:
    selector = KthMagnitude(pieces[0].dtype)
    while not selector.done:
        for piece in pieces:
            selector.add(piece)
        selector.end_pass(k)
    return selector.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kth_magnitude_is_exactly_kthvalue_of_the_concatenation(dtype):
    generator = torch.Generator().manual_seed(0)
    pieces = [(torch.randn(n, generator=generator) * scale).to(dtype) for n, scale in ((900, 1.0), (77, 30.0), (3000, 1e-4))]
    pieces += [torch.zeros(50, dtype=dtype), -pieces[0][:100]]  # zeros and repeated magnitudes
    flat = torch.cat(pieces).abs()
    for k in (1, 49, 51, 1000, 2345, flat.numel()):
        value = select(pieces, k)
        assert value.dtype == dtype and value == flat.kthvalue(k).values, (dtype, k)


def test_kth_magnitude_refuses_a_rank_outside_the_stream():
    with pytest.raises(ValueError, match="rank 11 is outside"):
        select([torch.ones(10)], 11)


def test_trim_rank_is_fusion_benchs_and_refuses_keeping_everything():
    assert trim_rank(1000, 20) == 800 and trim_rank(1000, 0.2) == 800 and trim_rank(7, 0.5) == 4
    with pytest.raises(ValueError, match="keeps 1000 of 1000"):
        trim_rank(1000, 100)


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_tensor_ties_with_whole_vector_thresholds_and_votes_is_fusion_benchs_ties(merge_func, seed):
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(3, 2000, generator=generator)
    vectors[1, :300] = -vectors[0, :300]  # exact cancellations: their elected sign is the majority's
    vectors[2, :300] = 0
    vectors[:, 1900:] = 0  # all zero
    pretrained = torch.randn(2000, generator=generator)
    expected = pretrained + 0.7 * ties_merging(vectors.clone(), reset_thresh=0.4, merge_func=merge_func)
    rank = trim_rank(2000, 0.4)
    pieces = [slice(0, 250), slice(250, 1234), slice(1234, 2000)]  # "tensors" of one model
    thresholds = torch.stack([select([vectors[t, p] for p in pieces], rank) for t in range(3)])
    majority = majority_sign(sum(sign_votes(trim(list(vectors[:, p]), thresholds)) for p in pieces))
    merged = torch.cat([ties_merge(pretrained[p], trim(list(vectors[:, p]), thresholds), majority, 0.7, merge_func)
                        for p in pieces])
    assert torch.equal(merged, expected)


def test_zero_sum_entries_take_the_majority_sign():
    trimmed = torch.tensor([[1.0, 2.0, -3.0], [-1.0, 0.0, 0.0]])
    assert elect_signs(trimmed, +1).tolist() == [1.0, 1.0, -1.0]
    assert elect_signs(trimmed, -1).tolist() == [-1.0, 1.0, -1.0]
    assert sign_votes(trimmed) == 0 and majority_sign(0) == 0 and majority_sign(-5) == -1


def test_dare_masks_match_fusion_benchs_global_generator_in_any_tensor_order():
    shapes = [((4, 6), torch.float32), ((5,), torch.bfloat16), ((3, 3), torch.float32)]
    tasks = [[torch.randn(s).to(d) for s, d in shapes] for _ in range(3)]
    torch.manual_seed(11)  # FusionBench: task after task, tensor after tensor, from the global generator
    expected = [[t.clone() for t in task] for task in tasks]
    for task in expected:
        for tensor in task:
            param_random_drop_(tensor, 0.4, rescale=True)
    generators = []
    for t in range(3):
        generator = torch.Generator().manual_seed(11)
        skip_draws(generator, [(torch.Size(s).numel(), d) for s, d in shapes] * t)
        generators.append(generator)
    for i in range(len(shapes)):  # tensor-major, as the streaming merge visits them
        for t in range(3):
            assert torch.equal(random_drop(tasks[t][i], 0.4, True, generators[t]), expected[t][i])
    assert not torch.equal(expected[0][0], expected[1][0])
