"""The benchmark baseline (reference/official_pave.py, the official two-pass inverse-form procedure
on stored activations) and our PAVE path give the same purified weights on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_bench_pave.pave.covariance import collect_covariance
from fusion_bench_pave.pave.models import LinearWeights
from fusion_bench_pave.pave.purification import PurifySettings, RegularizedCovariances, purify
from fusion_bench_pave.pave.task_statistics import CollectionSettings
from reference import pave_comparison
from reference.official_pave import doubling_inverse, greedy_trim

TINY = {
    "bert": dict(kind="bert", hidden=32, ffn=64, heads=2, layers=2, tasks=3, rows=256, seq=16, batch=4, eps0=0.1),
    "clip": dict(kind="clip", hidden=32, ffn=64, heads=2, layers=1, tasks=2, rows=200, batch=2, eps0=0.1),
    "mistral": dict(kind="mistral", hidden=64, ffn=128, heads=4, kv_heads=2, layers=1, tasks=2, rows=128, seq=16,
                    batch=2, eps0=0.01, modules=["k_proj", "v_proj", "down_proj"]),
}


@pytest.mark.parametrize(
    "kind, rho",
    [*((kind, pave_comparison.RHO) for kind in TINY), ("bert", 7 / 8)],  # 7/8 * 3 tasks * 32 = 84, an integer
)
def test_official_procedure_and_ours_give_the_same_purified_weights(kind, rho):
    setting = TINY[kind]
    pretrained, finetuned, batches = pave_comparison.build(setting)
    official, official_ranks = pave_comparison.run_official(pretrained, copy.deepcopy(finetuned), batches, setting, rho)
    ours, ranks = pave_comparison.run_ours(finetuned, batches, setting, rho)
    assert ranks == official_ranks
    kept = [r for by_layer in ranks.values() for r in by_layer.values()]
    full = [min(w.shape) for by_layer in ours.values() for w in by_layer.values()]
    assert sum(kept) < 0.95 * sum(full)  # something was actually pruned
    if kind == "mistral":
        assert set(ours["task0"]) == {"layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj", "layers.0.mlp.down_proj"}
    for task in ours:
        for layer, weight in ours[task].items():
            reference = official[task][layer]
            assert torch.linalg.norm(weight - reference) / torch.linalg.norm(reference) <= 1e-4, (task, layer)
        pruned = [l for l in ours[task] if ranks[task][l] < min(ours[task][l].shape)]
        original = pave_comparison.build(setting)[1][task]
        assert any(not torch.allclose(ours[task][l], original.get_submodule(l).weight, atol=1e-4) for l in pruned)


def test_baseline_doubling_and_greedy_follow_the_official_rules():
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    cov = x.T @ x / 6
    reg, inv, eps = doubling_inverse(cov, eps0=1e-6)
    assert torch.linalg.norm(inv @ reg - torch.eye(16)) < 5e-2
    half = cov + eps / 2 * torch.eye(16)
    assert torch.linalg.norm(torch.inverse(half) @ half - torch.eye(16)) >= 5e-2
    spectra = {"a": torch.tensor([1.0, 0.5, 0.1, 0.05]), "b": torch.tensor([1.0, 0.3, 0.2, 0.01])}
    # drop while kept/8 >= 0.7: b's 0.01, a's 0.05, a's 0.1 (0.1 < b's 0.2); 5/8 < 0.7 stops
    assert greedy_trim(spectra, 4, 0.7) == {"a": 2, "b": 3}


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("allocation", ["per_model", "per_layer", "uniform"])
def test_purified_weights_are_within_1e_6_of_the_exact_float64_svd_projection(kind, allocation):
    """Ours (eigh of the Gram of W C_eps, only the droppable columns of U) against U_r U_r^T W with U
    from the float64 SVD of the same W C_eps, at our ranks. 1e-6 is the project's accuracy bound:
    ours keeps float64 until the float32 output rounding (~6e-8), and the Gram's squared condition
    number costs ~1e-16 (S_1 / S_r)^2 / gap, far below it at these spectra."""
    setting = TINY[kind]
    _, finetuned, batches = pave_comparison.build(setting)
    includes = CollectionSettings(exclude=tuple(pave_comparison.excluded(setting))).includes
    stats = {t: collect_covariance(m, ((b, None) for b in batches[t]), includes, max_rows=setting["rows"])
             for t, m in finetuned.items()}
    weights = {t: LinearWeights(m) for t, m in finetuned.items()}
    settings = PurifySettings(rho=pave_comparison.RHO, allocation=allocation, eps0=setting["eps0"])
    purified, ranks, full = purify(weights, stats, settings)
    assert any(ranks[t][l] < full[l] for t in ranks for l in full)  # something was pruned
    error = pave_comparison.max_error_vs_exact(purified, ranks, weights, RegularizedCovariances(stats, settings))
    assert error <= 1e-6
