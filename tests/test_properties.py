"""Property tests (hypothesis) on random shapes: PAVE's rank allocator (budget, floor, optimality
against brute force) and SMILE's router and forward (a naive per-token reference)."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_bench_pave.pave.rank_allocation import allocate_layer, allocate_ranks, floor_rank, rank_budget
from fusion_bench_pave.smile import SmileLinear
from reference.smile_forward import naive_forward

FEW = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------- rank allocator
@st.composite
def layer_spectra(draw, max_models: int = 3, max_rank: int = 5):
    """T normalised spectra of length R: s_0 = 1, non-increasing, in [0, 1]."""
    models = draw(st.integers(1, max_models))
    rank = draw(st.integers(1, max_rank))
    unit = st.floats(0, 1, allow_nan=False)
    return [[1.0, *sorted(draw(st.lists(unit, min_size=rank - 1, max_size=rank - 1)), reverse=True)] for _ in range(models)]


def dropped_cost(spectra: list[list[float]], kept: list[int]) -> float:
    """Sum over models of the squared normalised singular values that are dropped."""
    return sum(s**2 for spectrum, r in zip(spectra, kept) for s in spectrum[r:])


rhos = st.floats(0.05, 1.0, allow_nan=False)
floor_factors = st.floats(0.0, 3.0, allow_nan=False)


@FEW
@given(spectra=layer_spectra(), rho=rhos, floor_factor=floor_factors)
def test_allocation_spends_the_budget_respects_the_floor_and_is_optimal(spectra, rho, floor_factor):
    models, rank = len(spectra), len(spectra[0])
    budget, floor = rank_budget(rank, models, rho), floor_rank(rank, rho, floor_factor)
    if budget < models:  # rho too small for one component per model: a clear error
        try:
            allocate_layer(spectra, rho, floor_factor)
        except ValueError as error:
            assert "leaves fewer than one component per model" in str(error)
            return
        raise AssertionError("allocate_layer accepted a budget below one component per model")
    assert budget / (models * rank) < rho <= (budget + 1) / (models * rank)  # the largest total below rho
    kept = allocate_layer(spectra, rho, floor_factor)
    total = max(budget, models * floor)  # the floor wins over the budget, as in the official search
    assert sum(kept) == total
    assert all(floor <= r <= rank for r in kept) and floor >= 1
    feasible = [c for c in itertools.product(range(floor, rank + 1), repeat=models) if sum(c) == total]
    best = min(dropped_cost(spectra, list(c)) for c in feasible)
    assert dropped_cost(spectra, kept) <= best + 1e-12


@FEW
@given(spectra=layer_spectra(max_models=3, max_rank=6), rho=st.floats(0.5, 1.0), layers=st.integers(1, 3))
def test_per_model_and_uniform_ranks_stay_in_range(spectra, rho, layers):
    by_layer = {f"l{i}": [s[: len(s) - i] or [1.0] for s in spectra] for i in range(layers)}
    if any(rank_budget(len(s[0]), len(s), rho) < len(s) for s in by_layer.values()):
        return
    for allocation in ("per_layer", "per_model", "uniform"):
        ranks = allocate_ranks(by_layer, rho, allocation)
        assert ranks.keys() == by_layer.keys()
        for layer, kept in ranks.items():
            full = len(by_layer[layer][0])
            assert len(kept) == len(spectra) and all(1 <= r <= full for r in kept)
            if allocation == "uniform":
                assert set(kept) == {max(1, math.floor(rho * full + 1e-9))}


# ------------------------------------------------------------------ SMILE router
@st.composite
def smile_layers(draw):
    """A SmileLinear (float64, seeded random parameters) of random shape and a batch of tokens."""
    n, m = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    experts = draw(st.integers(1, 4))
    max_rank = min(n, m)
    gate_k = draw(st.integers(1, max_rank))
    k = draw(st.sampled_from([0, *range(1, max_rank + 1)]))
    top_k = draw(st.integers(1, experts))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    layer = SmileLinear(n, m, experts, gate_k, k, top_k, bias=bias, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    batch = draw(st.sampled_from([(1,), (7,), (2, 5), (3, 1, 4)]))
    return layer, torch.randn(*batch, n, generator=gen, dtype=torch.float64)


@FEW
@given(case=smile_layers())
def test_router_weights_sum_to_one_over_distinct_top_experts(case):
    layer, x = case
    tokens = x.reshape(-1, layer.in_features)
    weights, selected = layer.routing(tokens)
    assert weights.shape == selected.shape == (tokens.shape[0], layer.top_k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens.shape[0], dtype=weights.dtype))
    assert (weights >= 0).all()
    for row in selected.tolist():
        assert len(set(row)) == len(row) and all(0 <= e < layer.num_experts for e in row)
    if layer.num_experts > 1:  # the selected experts score at least as high as every other one
        scores = torch.stack([torch.linalg.vector_norm(tokens @ g.T, dim=-1) for g in layer.router], -1)
        picked = scores.gather(1, selected).min(-1).values
        mask = torch.ones_like(scores, dtype=torch.bool).scatter_(1, selected, False)
        others = scores.masked_fill(~mask, -math.inf).max(-1).values
        assert (picked >= others - 1e-12).all()


@FEW
@given(case=smile_layers())
def test_forward_equals_the_naive_per_token_reference(case):
    layer, x = case
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (*x.shape[:-1], layer.out_features)
        torch.testing.assert_close(out, naive_forward(layer, x), rtol=1e-10, atol=1e-10)
