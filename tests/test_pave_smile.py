"""PAVE-SMILE (knowledge-aware SMILE): C = I reduces to plain SMILE, PAVE's projection and whitening
invariants, the spectral rank allocation spends exactly plain SMILE's parameter budget."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from pave_helpers import make_pool
from smile_helpers import finetuned_copies, tiny_clip_vision

from fusion_bench_pave.pave.purify import context_svd, project_weight
from fusion_bench_pave.smile import SmileLinear, upscale_model
from fusion_bench_pave.smile.algorithm import SmileUpscalingAlgorithm
from fusion_bench_pave.smile.knowledge_aware import (
    allocate_expert_ranks,
    context_expert,
    expert_factor,
    expert_parameter_count,
    layer_spectrum,
    whitened_router,
    whitening_factor,
)


def identity(task: int, layer: str) -> torch.Tensor:
    return torch.eye(64 if layer.endswith("fc2") else 32, dtype=torch.float64)


def random_spd(n: int, seed: int) -> torch.Tensor:
    """An anisotropic covariance (condition number ~1e3) plus a small ridge."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    return x.T @ x / (4 * n) + 1e-3 * torch.eye(n, dtype=torch.float64)


def covariances(task: int, layer: str) -> torch.Tensor:
    n = 64 if layer.endswith("fc2") else 32
    return random_spd(n, 1000 * task + sum(map(ord, layer)))


def upscale(pre, fts, **kw):
    return upscale_model(copy.deepcopy(pre), fts, gate_k=2, k=4, progress=False, **kw)


def smile_parameters(model: torch.nn.Module) -> int:
    return sum(m.expert_u.numel() + m.expert_svh.numel() for m in model.modules() if isinstance(m, SmileLinear))


# ------------------------------------------------------------------ C = I is plain SMILE
@pytest.mark.parametrize("subspace", ["knowledge_aware", "whitened"])
@pytest.mark.parametrize("allocation", ["uniform", "spectral"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identity_covariance_reduces_to_plain_smile(dtype, allocation, subspace):
    pre = tiny_clip_vision().to(dtype)
    fts = finetuned_copies(pre, 3)
    plain, plain_report = upscale(pre, fts, rank_allocation=allocation)
    aware, aware_report = upscale(pre, fts, rank_allocation=allocation, subspace=subspace, covariance=identity)
    assert aware_report.ranks == plain_report.ranks
    sp, sa = plain.state_dict(), aware.state_dict()
    assert sp.keys() == sa.keys()
    svh_tol = 1e-12 if dtype == torch.float64 else 4e-6  # float32: plain's S V^T carries the SVD's own ~1e-6 error
    for key in sp:
        if key.endswith("expert_svh"):
            rel = (sp[key] - sa[key]).abs().max() / sp[key].abs().max()
            assert rel <= svh_tol, (key, float(rel))
        else:  # U_k, routers (solve with L = I), weights, biases: the same bits
            assert torch.equal(sp[key], sa[key]), key
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    out_p, out_a = plain(pixel_values=x).last_hidden_state, aware(pixel_values=x).last_hidden_state
    assert (out_p - out_a).abs().max() <= (1e-12 if dtype == torch.float64 else 1e-5) * out_p.abs().max()


# --------------------------------------------------------------- the math of one layer
def test_expert_is_pave_projection_of_the_task_difference():
    gen = torch.Generator().manual_seed(0)
    dw = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    cov = random_spd(40, 3)
    u, svh = context_expert(dw, cov, k=5, rank=7, svd_method="full")
    u_pave, s = context_svd(dw, cov)  # PAVE's own context-oriented SVD as the oracle
    expert = u @ svh
    torch.testing.assert_close(expert, project_weight(dw, u_pave, 5), rtol=0, atol=1e-10)
    # the activated error on the task's inputs is exactly the dropped context spectrum
    assert torch.isclose(torch.linalg.matrix_norm((dw - expert) @ cov), s[5:].square().sum().sqrt(), rtol=1e-10)
    # and it beats the plain truncated SVD of the same rank on that error
    up, sp, vhp = torch.linalg.svd(dw, full_matrices=False)
    plain = up[:, :5] @ torch.diag(sp[:5]) @ vhp[:5]
    assert torch.linalg.matrix_norm((dw - expert) @ cov) < torch.linalg.matrix_norm((dw - plain) @ cov)


def test_whitened_expert_minimises_the_expected_output_error():
    gen = torch.Generator().manual_seed(5)
    dw = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    cov = random_spd(40, 6)
    factor = whitening_factor(cov)
    torch.testing.assert_close(factor @ factor.T, cov, rtol=0, atol=1e-12)
    u, svh = context_expert(dw, expert_factor(cov, "whitened"), k=5, rank=5, svd_method="full")
    s = torch.linalg.svdvals(dw @ factor)
    # E||(dW - expert) x||^2 = tr((dW - E) C (dW - E)^T): exactly the dropped whitened spectrum
    error = dw - u @ svh
    assert torch.isclose(torch.trace(error @ cov @ error.T), s[5:].square().sum(), rtol=1e-10)
    plain_u = torch.linalg.svd(dw, full_matrices=False)[0][:, :5]
    plain_error = dw - plain_u @ plain_u.T @ dw
    assert torch.trace(error @ cov @ error.T) < torch.trace(plain_error @ cov @ plain_error.T)
    assert expert_factor(cov, "knowledge_aware") is cov
    with pytest.raises(ValueError, match="no covariance factor"):
        expert_factor(cov, "plain")


def test_router_rows_are_whitened_singular_directions():
    gen = torch.Generator().manual_seed(1)
    dw = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    cov = random_spd(40, 4)
    g = 3
    factor = whitening_factor(cov)
    rows = whitened_router(dw, factor, g, rank=g, svd_method="full")
    # orthonormal in the task's metric: G C G^T = I, i.e. orthonormal in whitened coordinates
    torch.testing.assert_close(rows @ cov @ rows.T, torch.eye(g, dtype=torch.float64), rtol=0, atol=1e-9)
    # they span the top-g input directions of the activated change: ||dW C G^T||^2 = top-g energy of dW L
    s = torch.linalg.svdvals(dw @ factor)
    assert torch.isclose(torch.linalg.matrix_norm(dw @ cov @ rows.T), s[:g].square().sum().sqrt(), rtol=1e-10)
    with pytest.raises(ValueError, match="not positive definite"):
        whitening_factor(-cov)


# ------------------------------------------------------------------ rank allocation
def test_allocation_spends_exactly_the_budget_and_is_optimal():
    gen = torch.Generator().manual_seed(2)
    shapes = {"a": (6, 8), "b": (6, 8), "c": (6, 8), "d": (10, 4), "e": (10, 4)}
    spectra = {
        name: layer_spectrum([torch.sort(torch.rand(min(shape), generator=gen, dtype=torch.float64), descending=True).values for _ in range(3)])
        for name, shape in shapes.items()
    }
    k = 2
    ranks = allocate_expert_ranks(spectra, shapes, k)
    assert expert_parameter_count(shapes, ranks, 3) == expert_parameter_count(shapes, dict.fromkeys(shapes, k), 3)
    assert ranks != dict.fromkeys(shapes, k)  # random spectra: the budget actually moves
    for shape in {(6, 8), (10, 4)}:
        group = [n for n, s in shapes.items() if s == shape]
        assert sum(ranks[n] for n in group) == k * len(group)
        # brute force over every split with >= 1 per layer: the greedy keeps the most energy
        def kept(split):
            return sum(sum(x**2 for x in spectra[n][:r]) for n, r in zip(group, split))
        splits = [c for c in itertools.product(range(1, min(shape) + 1), repeat=len(group)) if sum(c) == k * len(group)]
        assert kept([ranks[n] for n in group]) == pytest.approx(max(kept(c) for c in splits), abs=1e-12)
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        allocate_expert_ranks(spectra, shapes, 5)


@pytest.mark.parametrize("subspace", ["plain", "knowledge_aware", "whitened"])
def test_spectral_model_has_plain_smile_parameter_count(subspace):
    pre = tiny_clip_vision()
    fts = finetuned_copies(pre, 3)
    plain, _ = upscale(pre, fts)
    cov = None if subspace == "plain" else covariances
    spectral, report = upscale(pre, fts, subspace=subspace, covariance=cov, rank_allocation="spectral")
    assert smile_parameters(spectral) == smile_parameters(plain) == 3 * 4 * 2 * (4 * 64 + 2 * 96)  # T k layers (q,k,v,o + fc1,fc2)
    assert sum(p.numel() for p in spectral.parameters()) == sum(p.numel() for p in plain.parameters())
    assert set(report.ranks.values()) != {4}


@pytest.mark.parametrize("subspace", ["knowledge_aware", "whitened"])
def test_knowledge_aware_changes_the_experts_and_reloads(tmp_path, subspace):
    pre = tiny_clip_vision()
    fts = finetuned_copies(pre, 3)
    plain, _ = upscale(pre, fts)
    aware, _ = upscale(pre, fts, subspace=subspace, covariance=covariances, rank_allocation="spectral")
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(pixel_values=x).last_hidden_state, aware(pixel_values=x).last_hidden_state, atol=1e-4)
    from fusion_bench_pave.smile.io import load_smile_model, save_smile_model

    save_smile_model(aware, tmp_path / "m")
    again = load_smile_model(copy.deepcopy(pre), tmp_path / "m").eval()
    assert torch.equal(again(pixel_values=x).last_hidden_state, aware.eval()(pixel_values=x).last_hidden_state)


def test_bad_options():
    pre = tiny_clip_vision()
    fts = finetuned_copies(pre, 2)
    for subspace in ("knowledge_aware", "whitened"):
        with pytest.raises(ValueError, match="needs the tasks' input covariances"):
            upscale(pre, fts, subspace=subspace)
    with pytest.raises(ValueError, match="subspace must be one of"):
        upscale(pre, fts, subspace="pca")
    with pytest.raises(ValueError, match="rank_allocation must be"):
        upscale(pre, fts, rank_allocation="greedy")
    with pytest.raises(ValueError, match="needs low-rank experts"):
        upscale_model(copy.deepcopy(pre), fts, gate_k=2, k=0, rank_allocation="spectral", progress=False)


# ------------------------------------------------------------------ FusionBench algorithm
def test_algorithm_collects_and_caches_covariances(tmp_path):
    settings = {"num_samples": 12, "batch_size": 4, "eps0": 0.01, "cache_dir": str(tmp_path / "cov")}
    algo = lambda: SmileUpscalingAlgorithm(gate_k=2, k=4, subspace="knowledge_aware", rank_allocation="spectral", covariance=settings)  # noqa: E731
    first = algo().run(make_pool("clip"))  # fresh pools: upscaling replaces the pool's pretrained layers in place
    assert len(list((tmp_path / "cov").glob("pave_cov_*.pt"))) == 3  # one per task
    second = algo().run(make_pool("clip"))  # from the cache: the same model
    plain = SmileUpscalingAlgorithm(gate_k=2, k=4).run(make_pool("clip"))
    assert smile_parameters(first) == smile_parameters(plain)
    x = torch.randn(2, 3, 32, 32)
    out = first(pixel_values=x).last_hidden_state
    assert torch.equal(out, second(pixel_values=x).last_hidden_state)
    assert not torch.allclose(out, plain(pixel_values=x).last_hidden_state, atol=1e-4)
    with pytest.raises(ValueError, match="regularization must be"):
        SmileUpscalingAlgorithm(gate_k=2, k=4, subspace="knowledge_aware", covariance={**settings, "regularization": "ridge"}).run(make_pool("clip"))


@pytest.mark.slow
def test_cli_knowledge_aware_on_tiny_clip(tmp_path):
    import json

    from conftest import REPO_ROOT, run_fusion_bench

    from fusion_bench_pave.smile.io import MANIFEST

    log_dir, saved, cov = tmp_path / "logs", tmp_path / "smile", tmp_path / "cov"
    run_fusion_bench(["method=smile_upscaling", "method.gate_k=2", "method.k=4", "method.subspace=knowledge_aware",
                      "method.rank_allocation=spectral", "method.covariance.num_samples=32", f"method.covariance.cache_dir={cov}",
                      f"method.model_path={saved}", "modelpool=tiny_clip", "taskpool=tiny_clip", f"path.log_dir={log_dir}",
                      "print_config=false"], cwd=REPO_ROOT)
    assert (log_dir / "program_report.json").is_file()
    assert len(list(cov.glob("pave_cov_*.pt"))) == 3
    modules = json.loads((saved / MANIFEST).read_text())["modules"]
    # 2 layers x (q, k, v, out_proj: 32x32; fc1: 64x32; fc2: 32x64): each shape group keeps k = 4 per layer on average
    groups: dict[tuple[int, int], list[int]] = {}
    for spec in modules.values():
        groups.setdefault((spec["out_features"], spec["in_features"]), []).append(spec["k"])
    assert {shape: sum(ks) / len(ks) for shape, ks in groups.items()} == {(32, 32): 4, (64, 32): 4, (32, 64): 4}
