"""Diagnostic (b): random removal with PAVE's C-weighted energy (benchmarks/random_control.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.random_control import output_energy, random_removal
from fusion_bench_pave.pave.purify import context_svd, remove_subspace


def _layer(out: int = 8, inp: int = 10):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = torch.randn(50, inp, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2, inp, dtype=torch.float64)
    return w, x.T @ x / 50


def test_output_energy_is_the_mean_squared_output_change():
    w, _ = _layer()
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert output_energy(w, x.T @ x / 50) == pytest.approx(float((x @ w.T).square().sum() / 50), rel=1e-12)


@pytest.mark.parametrize("dim", [1, 3])
def test_random_removal_matches_paves_energy_in_a_random_subspace_of_its_dimension(dim):
    w, cov = _layer()
    u, _ = context_svd(w, cov + 0.1 * torch.eye(10, dtype=torch.float64))
    removed = w - remove_subspace(w, u[:, u.shape[1] - dim:])  # PAVE's removed part at rank R - dim
    got = random_removal(w, removed, cov, dim, torch.Generator().manual_seed(0))
    delta = w - got
    assert output_energy(delta, cov) == pytest.approx(output_energy(removed, cov), rel=1e-10)
    assert int(torch.linalg.matrix_rank(delta)) == dim
    assert torch.linalg.norm(delta - removed) > 0.1 * torch.linalg.norm(removed)  # not PAVE's directions
    again = random_removal(w, removed, cov, dim, torch.Generator().manual_seed(0))
    assert torch.equal(got, again)  # seeded
    assert random_removal(w.float(), removed, cov, dim, torch.Generator().manual_seed(0)).dtype == torch.float32


def test_nothing_removed_returns_the_weight():
    w, cov = _layer()
    assert random_removal(w, torch.zeros_like(w), cov, 2, torch.Generator()) is w
    assert random_removal(w, w, cov, 0, torch.Generator()) is w
