"""PAVE pure math: streaming covariance, regularisation, purification, spectral rank allocation."""

from __future__ import annotations

import itertools
import math
from typing import get_args

import pytest
import torch
from torch import nn

from fusion_bench_pave.pave.calibration import sample_indices, shard
from fusion_bench_pave.pave.covariance import BLOCK, add_gram_, collect_covariance, symmetrize_
from fusion_bench_pave.pave.purify import (
    context_eigh,
    context_svd,
    project_weight,
    purify_weight,
    remove_subspace,
)
from fusion_bench_pave.pave.rank_allocation import (
    allocate_layer,
    allocate_ranks,
    floor_rank,
    layer_total,
    normalized_spectrum,
    rank_budget,
)
from fusion_bench_pave.pave.regularize import Regularization, regularize, regularize_doubling, regularize_relative
from reference.official_pave import greedy_trim


# ------------------------------------------------------------------ covariance
class TwoHeads(nn.Module):
    """q/k read the same tensor, out reads another; `mlp` reads its own input."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, 3)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        a = self.q(h) + self.k(h).sum(-1, keepdim=True)
        return self.mlp(self.out(a))


def _captured_inputs(model: nn.Module, batches):
    """Oracle: store every Linear input (what PAVE must not do) and return them per module."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: store.setdefault(n, []).append(args[0].detach()))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        for inputs, mask in batches:
            model(**inputs)
    for h in handles:
        h.remove()
    return store


@pytest.mark.parametrize("width", [6, BLOCK + 44])  # one block row; two, the last one ragged
def test_streaming_covariance_equals_stored_activations_and_shares_inputs(width):
    torch.manual_seed(0)
    model = TwoHeads(width)
    batches = [({"x": torch.randn(3, 5, width)}, None) for _ in range(4)]
    stats = collect_covariance(model, batches)
    stored = _captured_inputs(model, batches)
    assert stats.input_of["k"] == "q"  # shared input computed once
    assert set(stats.xtx) == {"q", "out", "mlp"}
    for name, xs in stored.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        torch.testing.assert_close(stats.covariance(name), x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)
        assert stats.count[stats.input_of[name]] == 60


@pytest.mark.parametrize("size, block", [(10, 4), (10, 1), (10, 10), (10, 64), (BLOCK + 44, BLOCK)])
def test_blocked_lower_sums_touch_only_the_block_lower_triangle_and_mirror_to_the_gram_matrix(size, block):
    generator = torch.Generator().manual_seed(size * block)
    batches = [torch.randn(n, size, generator=generator, dtype=torch.float64) for n in (7, 0, 13)]
    acc = torch.zeros(size, size, dtype=torch.float64)
    for rows in batches:
        add_gram_(acc, rows, block)
    row, col = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    beyond = col >= (row // block + 1) * block  # right of each row's diagonal block: never computed
    assert not acc[beyond].any() and acc[~beyond].all()
    x = torch.cat(batches)
    symmetrize_(acc)
    assert torch.equal(acc, acc.T)
    torch.testing.assert_close(acc, x.T @ x, rtol=1e-12, atol=1e-12)


def test_padding_mask_drops_exactly_the_masked_tokens():
    torch.manual_seed(1)
    model = TwoHeads()
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    masked = collect_covariance(model, [({"x": x}, mask)])
    real = collect_covariance(model, [({"x": x[0:1, :3]}, None), ({"x": x[1:2, :2]}, None)])
    assert masked.count["q"] == 5
    for name in ["q", "k", "out", "mlp"]:
        # float32 model: only BLAS blocking differs between the two batchings
        torch.testing.assert_close(masked.covariance(name), real.covariance(name), rtol=1e-6, atol=1e-6)


def test_row_cap_keeps_the_first_rows_and_stops_early():
    torch.manual_seed(6)
    model = TwoHeads()
    x = torch.randn(5, 2, 4, 6)
    mask = torch.ones(5, 2, 4, dtype=torch.long)
    mask[:, 1, 3] = 0
    consumed = []

    def batches():
        for i in range(5):
            consumed.append(i)
            yield {"x": x[i]}, mask[i]

    stats = collect_covariance(model, batches(), max_rows=10)
    assert consumed == [0, 1]  # 7 + 7 real rows >= 10: the last three batches never run
    rows = torch.cat([x[i].reshape(-1, 6)[mask[i].reshape(-1).bool()] for i in range(2)])[:10]
    h = torch.tanh(rows).double()
    assert stats.count == {"q": 10, "out": 10, "mlp": 10}
    torch.testing.assert_close(stats.covariance("k"), h.T @ h / 10, rtol=1e-6, atol=1e-6)


def test_mask_shape_mismatch_is_a_clear_error():
    model = TwoHeads()
    with pytest.raises(ValueError, match="mask_padding=false"):
        collect_covariance(model, [({"x": torch.randn(2, 4, 6)}, torch.ones(2, 3))])


def test_bf16_model_accumulates_in_float64():
    torch.manual_seed(2)
    model = TwoHeads()
    batches = [({"x": torch.randn(4, 8, 6)}, None)]
    ref = collect_covariance(model, batches)
    low = collect_covariance(model.to(torch.bfloat16), [({"x": batches[0][0]["x"].bfloat16()}, None)])
    assert low.xtx["q"].dtype == torch.float64
    torch.testing.assert_close(low.covariance("out"), ref.covariance("out"), rtol=5e-2, atol=5e-2)


def test_all_reduce_of_shards_equals_whole():
    torch.manual_seed(3)
    model = TwoHeads()
    batches = [({"x": torch.randn(2, 3, 6)}, None) for _ in range(4)]
    whole = collect_covariance(model, batches)
    parts = [collect_covariance(model, batches[r::2]) for r in range(2)]
    # a fake 2-process all-reduce: each shard's tensor plus the other shard's matching tensor
    others = iter([parts[1].xtx[k] for k in sorted(parts[1].xtx)] + [
        torch.tensor([parts[1].count[k] for k in sorted(parts[1].count)], dtype=torch.float64)
    ])
    reduced = parts[0].all_reduce(lambda t: t + next(others))
    for name in ["q", "out", "mlp"]:
        torch.testing.assert_close(reduced.covariance(name), whole.covariance(name), rtol=1e-12, atol=1e-12)
    assert reduced.count == whole.count


def test_shards_deal_whole_batches_and_cover_every_sample_once():
    indices = sample_indices(100, 23, seed=3, task="t")
    assert indices == sample_indices(100, 23, seed=3, task="t") and len(set(indices)) == 23
    shards = [shard(indices, r, 3, 4) for r in range(3)]
    assert sorted(i for s in shards for i in s) == sorted(indices)
    batches = [indices[i : i + 4] for i in range(0, 23, 4)]
    assert shards[1] == batches[1] + batches[4]
    with pytest.raises(ValueError, match="asked for 24 calibration samples.*only 23 rows"):
        sample_indices(23, 24, seed=0, task="t")


# -------------------------------------------------------------- regularisation
def test_doubling_rule_meets_the_official_criterion_and_doubles():
    torch.manual_seed(4)
    x = torch.randn(6, 16, dtype=torch.float64)
    cov = x.T @ x / 6  # rank 6 of 16: singular
    reg, eps = regularize_doubling(cov, eps0=1e-9, tol=5e-2)
    assert math.log2(eps / 1e-9) == pytest.approx(round(math.log2(eps / 1e-9)))
    low = reg.float()
    assert torch.linalg.matrix_norm(torch.linalg.inv(low) @ low - torch.eye(16)) < 5e-2
    # eps / 2 would fail the check (or eps is eps0)
    half = (cov + eps / 2 * torch.eye(16, dtype=torch.float64)).float()
    assert eps == 1e-9 or torch.linalg.matrix_norm(torch.linalg.inv(half) @ half - torch.eye(16)) >= 5e-2
    torch.testing.assert_close(reg - cov, eps * torch.eye(16, dtype=torch.float64))


def test_relative_rule():
    cov = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    reg, eps = regularize_relative(cov, alpha=0.1)
    assert eps == pytest.approx(0.2)
    torch.testing.assert_close(reg, cov + 0.2 * torch.eye(3, dtype=torch.float64))


def test_regularize_runs_every_listed_rule_with_its_own_settings():
    cov = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    expected_eps = {"doubling": 0.5, "relative": 0.2}  # eps0 passes the check at once; 0.1 * mean diag
    assert sorted(expected_eps) == sorted(get_args(Regularization))
    for rule, eps in expected_eps.items():
        reg, chosen = regularize(cov, rule, eps0=0.5, tol=5e-2, alpha=0.1)
        assert chosen == pytest.approx(eps)
        assert torch.equal(reg, cov + chosen * torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"regularization must be one of doubling, relative; got 'ridge'"):
        regularize(cov, "ridge", eps0=0.5, tol=5e-2, alpha=0.1)


def _covariance_with_eigenvalues(values: list[float], seed: int = 3) -> torch.Tensor:
    """Q diag(values) Q^T with a seeded random orthogonal Q (float64)."""
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def test_relative_rule_is_an_absolute_eps_in_units_of_the_mean_eigenvalue():
    cov = _covariance_with_eigenvalues([1.4, 0.5, 0.07, 0.02, 0.01])  # mean eigenvalue 0.4
    reg, eps = regularize_relative(cov, alpha=0.25)
    assert eps == pytest.approx(0.1, rel=1e-12)  # the official eps0, reached through the mean eigenvalue
    official, official_eps = regularize_doubling(cov, eps0=0.1, tol=5e-2)  # passes at once
    assert official_eps == 0.1
    torch.testing.assert_close(reg, official, rtol=0, atol=1e-15)
    manual = cov + 0.25 * (torch.trace(cov) / 5) * torch.eye(5, dtype=torch.float64)  # float64 by hand
    torch.testing.assert_close(reg, manual, rtol=0, atol=1e-15)


def test_relative_rule_makes_purification_independent_of_the_inputs_scale():
    # scaling the inputs by 10 scales C by 100: the relative eps follows, the absolute one does not
    w, _ = _problem(6, 5)
    cov = _covariance_with_eigenvalues([1.4, 0.5, 0.07, 0.02, 0.01])
    small = cov / 100
    assert regularize_relative(small, 0.25)[1] == pytest.approx(1e-3, rel=1e-12)
    torch.testing.assert_close(purify_weight(w, regularize_relative(small, 0.25)[0], 2),
                               purify_weight(w, regularize_relative(cov, 0.25)[0], 2), rtol=0, atol=1e-12)
    absolute = purify_weight(w, regularize_doubling(small, 0.1)[0], 2)
    assert torch.linalg.norm(absolute - purify_weight(w, regularize_doubling(cov, 0.1)[0], 2)) > 1e-2


# ----------------------------------------------------------------- purification
def _problem(out: int = 12, inp: int = 9, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = torch.randn(40, inp, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, inp, dtype=torch.float64)
    cov = x.T @ x / 40 + 0.01 * torch.eye(inp, dtype=torch.float64)
    return w, cov


@pytest.mark.parametrize("shape", [(12, 9), (7, 15)])
@pytest.mark.parametrize("rank", [1, 4, 6])
def test_projection_form_equals_inverse_form(shape, rank):
    w, cov = _problem(*shape)
    u, s, vh = torch.linalg.svd(w @ cov, full_matrices=False)
    inverse_form = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] @ torch.linalg.inv(cov)
    u_eigh, s_eigh = context_eigh(w, cov)  # the algorithm's decomposition (Gram eigh; tall and wide shapes)
    torch.testing.assert_close(s_eigh, s, rtol=1e-10, atol=1e-10)
    projected = purify_weight(w, cov, rank)
    # tall W: U = M V / S carries ~1e-16 * S_1^2 / S_i of rounding in its smallest columns
    eigh_projected = remove_subspace(w, u_eigh[:, rank:])
    assert torch.linalg.norm(eigh_projected - projected) / torch.linalg.norm(projected) <= 1e-8
    dropped, s_start = context_eigh(w, cov, rank)  # columns rank.. only: same eigh; tall M V is a narrower GEMM
    assert torch.equal(s_start, s_eigh) and dropped.shape[1] == len(s) - rank
    torch.testing.assert_close(dropped, u_eigh[:, rank:], rtol=0, atol=1e-12)
    assert torch.linalg.norm(projected - inverse_form) / torch.linalg.norm(inverse_form) <= 1e-5
    # activated pruning error = sqrt(sum of dropped S^2)
    err = torch.linalg.norm((w - projected) @ cov)
    assert err.item() == pytest.approx(s[rank:].square().sum().sqrt().item(), rel=1e-8)


@pytest.mark.parametrize("shape", [(7, 15), (12, 9)])
def test_removing_from_the_task_vector_projects_tau(shape):
    w, cov = _problem(*shape)
    pretrained = w + 0.3 * torch.randn(*shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    tau = w - pretrained
    u, _ = context_svd(w, cov)
    rank = 3
    got = remove_subspace(w, u[:, rank:], pretrained)
    u_r, u_d = u[:, :rank], u[:, rank:]
    if shape[0] <= shape[1]:  # U spans R^out: tau_tilde = U_r U_r^T tau, in span(U_r)
        torch.testing.assert_close(got - pretrained, u_r @ (u_r.T @ tau), rtol=0, atol=1e-12)
        assert torch.linalg.norm(got - pretrained - u_r @ (u_r.T @ (got - pretrained))) < 1e-12
    else:  # tau's part outside span(U) is kept, only the dropped directions are removed
        torch.testing.assert_close(got - pretrained, tau - u_d @ (u_d.T @ tau), rtol=0, atol=1e-12)
    # the paper's form removes U_d U_d^T W_ft, i.e. also U_d U_d^T W_pre: the two differ
    assert torch.linalg.norm(remove_subspace(w, u_d) - got) > 0.1
    assert remove_subspace(w, u[:, u.shape[1]:], pretrained) is w  # nothing dropped: W itself


def test_full_rank_returns_the_weight_bit_for_bit():
    w, cov = _problem()
    w32 = w.float()
    u, _ = context_svd(w32, cov)
    assert project_weight(w32, u, u.shape[1]) is w32


def test_identity_covariance_reduces_to_truncated_svd():
    w, _ = _problem()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(
        purify_weight(w, torch.eye(w.shape[1], dtype=torch.float64), 3), u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    )


def test_purify_keeps_dtype():
    w, cov = _problem()
    assert purify_weight(w.bfloat16(), cov, 3).dtype == torch.bfloat16


# -------------------------------------------------------------- rank allocation
def _random_spectra(num_models: int, full_rank: int, seed: int) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    spectra = []
    for _ in range(num_models):
        s = torch.rand(full_rank, generator=g, dtype=torch.float64).pow(torch.rand(1, generator=g) * 4)
        spectra.append(normalized_spectrum(s.sort(descending=True).values))
    return spectra


def _cost(spectra, kept) -> float:
    return sum(sum(x * x for x in s[k:]) for s, k in zip(spectra, kept))


def _sort_optimum(spectra, rho, floor_factor):
    """Oracle: drop the D globally smallest droppable (beyond-floor) components."""
    full_rank = len(spectra[0])
    drops = len(spectra) * full_rank - layer_total(full_rank, len(spectra), rho, floor_factor)
    floor = floor_rank(full_rank, rho, floor_factor)
    candidates = sorted((s[i] ** 2, m) for m, s in enumerate(spectra) for i in range(floor, full_rank))
    kept = [full_rank] * len(spectra)
    for _, m in candidates[:drops]:
        kept[m] -= 1
    return kept


@pytest.mark.parametrize("seed", range(20))
def test_greedy_equals_sort_optimum(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    num_models = int(torch.randint(2, 9, (1,), generator=g))
    full_rank = int(torch.randint(4, 80, (1,), generator=g))
    rho = float(torch.empty(1).uniform_(0.3, 1.0, generator=g))
    if seed % 2:  # a dyadic rho with rho*T*R an integer: the search stops one below it
        rho = round(rho * num_models * full_rank) / (num_models * full_rank)
    spectra = _random_spectra(num_models, full_rank, seed)
    kept = allocate_layer(spectra, rho)
    assert kept == _sort_optimum(spectra, rho, 1.5)
    assert sum(kept) == max(rank_budget(full_rank, num_models, rho), num_models * floor_rank(full_rank, rho))
    assert min(kept) >= floor_rank(full_rank, rho)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_brute_force(seed):
    spectra = _random_spectra(3, 6, 50 + seed)
    for rho, budget in [(0.6, 10), (5 / 6, 14)]:  # 10.8 -> 10; 15 is an integer -> 14
        floor = floor_rank(6, rho)
        assert rank_budget(6, 3, rho) == budget and 3 * floor <= budget
        feasible = [k for k in itertools.product(range(floor, 7), repeat=3) if sum(k) <= budget]
        best = min(_cost(spectra, k) for k in feasible)
        assert _cost(spectra, allocate_layer(spectra, rho)) == pytest.approx(best, abs=1e-12)


def test_budget_stops_strictly_below_rho_like_the_official_search():
    # rho*T*R an integer (the usual case at dyadic rho and widths 384/768/4096): one fewer
    assert rank_budget(768, 8, 63 / 64) == 6047
    assert rank_budget(384, 3, 7 / 8) == 1007
    assert rank_budget(4096, 2, 4089 / 4096) == 8177
    assert rank_budget(32, 3, 0.875) == 83
    # otherwise floor(rho*T*R)
    assert rank_budget(32, 2, 0.9) == 57 and rank_budget(32, 3, 0.9) == 86
    # float products that land a hair off the integer are judged as the official k/(T*R) >= rho is
    assert 0.28 * 25 > 7 and rank_budget(25, 1, 0.28) == 6
    assert 0.57 * 100 < 57 and rank_budget(100, 1, 0.57) == 56
    assert rank_budget(5, 2, 1.0) == 9  # rho=1: the floor (R) keeps everything


def test_greedy_matches_the_official_trim_on_integer_budgets():
    for seed, (num_models, full_rank, rho) in enumerate(
        [(8, 64, 63 / 64), (3, 32, 7 / 8), (2, 64, 31 / 32), (4, 48, 0.75), (3, 40, 0.9), (2, 16, 0.5)]
    ):
        spectra = _random_spectra(num_models, full_rank, 70 + seed)
        official = greedy_trim({m: torch.tensor(s) for m, s in enumerate(spectra)}, full_rank, rho)
        assert allocate_layer(spectra, rho) == [official[m] for m in range(num_models)]
        assert sum(official.values()) == math.ceil(rho * num_models * full_rank) - 1


def test_ties_go_to_the_lowest_model_index():
    spectra = [[1.0, 0.5, 0.2], [1.0, 0.5, 0.2]]
    # 4/6 >= 2/3, so 3 are kept: both 0.2 go first (model 0's, then model 1's), then model 0's 0.5
    assert allocate_layer(spectra, 2 / 3) == [1, 2]  # floor 1
    official = greedy_trim({0: torch.tensor(spectra[0]), 1: torch.tensor(spectra[1])}, 3, 2 / 3)
    assert official == {0: 1, 1: 2}


def test_floor_formula_and_binding_floor():
    assert floor_rank(32, 0.9) == 28  # dropped 3 -> 1.5*3=4.5 -> 4
    assert floor_rank(64, 63 / 64) == 62
    assert floor_rank(10, 0.1) == 1  # clamped to one component
    # round(63/64 * 32) = 32: floor 32, so nothing is dropped although the budget is 95 of 96
    assert floor_rank(32, 63 / 64) == 32
    spectra = _random_spectra(3, 32, 9)
    assert allocate_layer(spectra, 63 / 64) == [32, 32, 32]
    assert greedy_trim({m: torch.tensor(s) for m, s in enumerate(spectra)}, 32, 63 / 64) == {0: 32, 1: 32, 2: 32}
    with pytest.raises(ValueError, match="fewer than one component per model"):
        allocate_layer(_random_spectra(3, 4, 9), 0.1)
    # one model with a flat spectrum would drop everything if there were no floor
    spectra = [[1.0] + [1e-6] * 31, [1.0] * 32]
    # budget floor(0.9*64) = 57: model 0 stops at its floor 28, model 1 drops the remaining 3
    assert allocate_layer(spectra, 0.9) == [28, 29]


def test_rho_one_keeps_everything_in_all_modes():
    spectra = {"a": _random_spectra(3, 8, 1), "b": _random_spectra(3, 5, 2)}
    for mode in ["per_layer", "per_model", "uniform"]:
        assert allocate_ranks(spectra, 1.0, mode) == {"a": [8, 8, 8], "b": [5, 5, 5]}


def test_per_model_collapses_to_one_ratio_per_model():
    spectra = {"a": _random_spectra(3, 40, 3), "b": _random_spectra(3, 20, 4)}
    per_layer = allocate_ranks(spectra, 0.7, "per_layer")
    per_model = allocate_ranks(spectra, 0.7, "per_model")
    for m in range(3):
        ratio = (per_layer["a"][m] + per_layer["b"][m]) / 60
        assert per_model["a"][m] == max(1, round(ratio * 40))
        assert per_model["b"][m] == max(1, round(ratio * 20))


def test_uniform_and_invalid_rho():
    spectra = {"a": _random_spectra(2, 10, 5)}
    assert allocate_ranks(spectra, 0.55, "uniform") == {"a": [5, 5]}
    for rho in [0.0, -0.1, 1.01]:
        with pytest.raises(ValueError, match="rho must be in"):
            allocate_ranks(spectra, rho)
    with pytest.raises(ValueError, match="allocation must be"):
        allocate_ranks(spectra, 0.5, "nope")


def test_doubling_with_residual_estimate_picks_the_exact_rules_eps():
    from fusion_bench_pave.pave.regularize import inverse_check, inverse_residual

    g = torch.Generator().manual_seed(3)
    for rows, dim, eps0 in [(8, 64, 1e-7), (40, 64, 1e-4), (400, 64, 0.1), (30, 200, 1e-6)]:
        x = torch.randn(rows, dim, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, dim, dtype=torch.float64)
        cov = x.T @ x / rows
        eps = eps0  # the exact rule, explicit inverse at every step
        while inverse_residual((cov + eps * torch.eye(dim, dtype=torch.float64)).float()) >= 5e-2:
            eps *= 2
        reg, chosen = regularize_doubling(cov, eps0=eps0, tol=5e-2)
        assert chosen == eps
        torch.testing.assert_close(reg, cov + eps * torch.eye(dim, dtype=torch.float64), rtol=0, atol=0)
        # the check agrees with the exact norm on both sides of tol, including inside the guard band
        for tol in [1e-6, 1e-3, 5e-2, 1.0, 1e3]:
            assert inverse_check(reg.float(), tol) == (inverse_residual(reg.float()) < tol)
