"""The pure purification API over {task: {layer: weight}}: equal to an independent per-layer
recomputation, its streaming and collected forms agree bit for bit, and it never writes its inputs."""

from __future__ import annotations

import pytest
import torch

from fusion_bench_pave.pave.covariance import CovarianceStats
from fusion_bench_pave.pave.purification import PurifySettings, iter_purified, purifiable_layers, purify
from fusion_bench_pave.pave.purify import context_svd, purify_weight
from fusion_bench_pave.pave.rank_allocation import allocate_ranks, normalized_spectrum
from fusion_bench_pave.pave.regularize import regularize

SHAPES = {"enc.q": (5, 6), "enc.k": (7, 6), "enc.fc2": (4, 9)}  # q and k read one input


def settings(**overrides) -> PurifySettings:
    values = dict(rho=0.7, allocation="per_layer", floor_factor=1.5, regularization="doubling", eps0=0.01,
                  eps_tol=5e-2, relative_alpha=1e-3)
    return PurifySettings(**{**values, **overrides})


def pool(tasks: int = 3) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    weights, statistics = {}, {}
    for t in range(tasks):
        x, y = (torch.randn(40, d, generator=generator, dtype=torch.float64) for d in (6, 9))
        statistics[f"task{t}"] = CovarianceStats(
            xtx={"enc.q": x.T @ x, "enc.fc2": y.T @ y}, count={"enc.q": 40, "enc.fc2": 40},
            input_of={"enc.q": "enc.q", "enc.k": "enc.q", "enc.fc2": "enc.fc2"})
        weights[f"task{t}"] = {name: torch.randn(*shape, generator=generator) for name, shape in SHAPES.items()}
    return weights, statistics


@pytest.mark.parametrize("allocation", ["per_layer", "per_model", "uniform"])
def test_purify_equals_a_per_layer_recomputation(allocation):
    weights, statistics = pool()
    purified, ranks, full_ranks = purify(weights, statistics, settings(allocation=allocation))
    spectra = {}
    for layer in SHAPES:
        spectra[layer] = []
        for task in weights:
            cov_eps, _ = regularize(statistics[task].covariance(layer), "doubling", 0.01, 5e-2, 1e-3)
            spectra[layer].append(normalized_spectrum(context_svd(weights[task][layer], cov_eps)[1]))
    expected = allocate_ranks(spectra, 0.7, allocation, 1.5)
    assert full_ranks == {layer: min(shape) for layer, shape in SHAPES.items()}
    for i, task in enumerate(weights):
        assert ranks[task] == {layer: expected[layer][i] for layer in SHAPES}
        for layer in SHAPES:
            cov_eps, _ = regularize(statistics[task].covariance(layer), "doubling", 0.01, 5e-2, 1e-3)
            reference = purify_weight(weights[task][layer], cov_eps, ranks[task][layer])
            # eigh of the Gram matrix vs SVD of W C_eps, both float64, output float32
            torch.testing.assert_close(purified[task][layer], reference, rtol=0, atol=1e-5)
    assert min(r for task_ranks in ranks.values() for r in task_ranks.values()) < 4  # something was dropped


@pytest.mark.parametrize("allocation", ["per_layer", "per_model"])
def test_written_back_streamed_and_redecomposed_results_are_bit_identical(allocation):
    weights, statistics = pool()
    before = {t: {l: w.clone() for l, w in layers.items()} for t, layers in weights.items()}
    purified, ranks, full_ranks = purify(weights, statistics, settings(allocation=allocation))
    written: dict = {}
    _, ranks_written, _ = purify(weights, statistics, settings(allocation=allocation),
                                 write=lambda task, layer, w: written.setdefault(task, {}).__setitem__(layer, w))
    # no kept U columns at all: per_model decomposes every pruned layer again
    streamed = {l.layer: l for l in iter_purified(weights, statistics, settings(allocation=allocation), tail_bytes=0)}
    assert ranks_written == ranks
    for task in weights:
        for layer in SHAPES:
            assert torch.equal(written[task][layer], purified[task][layer])
            assert torch.equal(streamed[layer].weights[task], purified[task][layer])
            assert torch.equal(weights[task][layer], before[task][layer])  # inputs untouched


def test_full_rank_returns_the_given_tensors_and_layers_need_statistics_in_every_task():
    weights, statistics = pool()
    purified, ranks, _ = purify(weights, statistics, settings(rho=1.0))
    assert all(purified[t][l] is weights[t][l] for t in weights for l in SHAPES)
    del statistics["task1"].input_of["enc.k"]
    assert purifiable_layers(statistics) == ["enc.q", "enc.fc2"]


def test_task_vector_target_projects_each_task_vector_with_the_same_basis():
    weights, statistics = pool()
    generator = torch.Generator().manual_seed(1)
    pretrained = {name: torch.randn(*shape, generator=generator) for name, shape in SHAPES.items()}
    paper, paper_ranks, _ = purify(weights, statistics, settings())
    purified, ranks, _ = purify(weights, statistics, settings(purify_target="task_vector"), pretrained=pretrained)
    assert ranks == paper_ranks  # the same spectra, so the same allocation
    for task in weights:
        for layer in SHAPES:
            cov_eps, _ = regularize(statistics[task].covariance(layer), "doubling", 0.01, 5e-2, 1e-3)
            u, _ = context_svd(weights[task][layer], cov_eps)
            w, w_pre = weights[task][layer].double(), pretrained[layer].double()
            u_d = u[:, ranks[task][layer]:]
            expected = w - u_d @ (u_d.T @ (w - w_pre))  # = W_pre + U_r U_r^T tau where U spans R^out (q, fc2)
            torch.testing.assert_close(purified[task][layer].double(), expected, rtol=0, atol=1e-5)
            if ranks[task][layer] < min(SHAPES[layer]):
                assert not torch.allclose(purified[task][layer], paper[task][layer], atol=1e-3)
    full, _, _ = purify(weights, statistics, settings(rho=1.0, purify_target="task_vector"), pretrained=pretrained)
    assert all(full[t][l] is weights[t][l] for t in weights for l in SHAPES)
    with pytest.raises(ValueError, match="purify_target='task_vector' needs the pretrained weights"):
        purify(weights, statistics, settings(purify_target="task_vector"))
