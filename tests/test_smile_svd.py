"""Truncated / randomized SVD: accuracy against the exact SVD, fallback, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from fusion_bench_pave.smile import svd as svd_mod
from fusion_bench_pave.smile.svd import full_svd, randomized_svd, top_svd, triplet_residual


def decaying(m: int, n: int, decay: float = 0.9, seed: int = 0) -> torch.Tensor:
    """A matrix whose singular values are decay**i (like a fine-tuning update)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    return (u * decay ** torch.arange(min(m, n), dtype=torch.float32)) @ v.T


def test_full_svd_matches_torch():
    a = torch.randn(40, 24)
    t = full_svd(a, 10)
    s = torch.linalg.svdvals(a)[:10]
    torch.testing.assert_close(t.s, s)
    assert triplet_residual(a, t) < 1e-5


def test_randomized_svd_is_accurate_on_decaying_spectrum():
    a = decaying(600, 400)
    rank = 32
    exact, (approx, converged) = full_svd(a, rank), randomized_svd(a, rank)
    assert converged
    torch.testing.assert_close(approx.s, exact.s, rtol=1e-4, atol=1e-6)
    # same subspace: the rank-r reconstructions agree, so experts/routers built from either agree
    rec = lambda t: (t.u * t.s) @ t.v.T  # noqa: E731
    assert torch.linalg.norm(rec(approx) - rec(exact)) / torch.linalg.norm(rec(exact)) < 1e-4
    assert triplet_residual(a, approx) < 1e-4


def test_auto_uses_randomized_for_small_rank_and_is_deterministic(monkeypatch):
    a = decaying(512, 300)
    calls = []
    real = svd_mod.randomized_svd
    monkeypatch.setattr(svd_mod, "randomized_svd", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    t1, t2 = top_svd(a, 16), top_svd(a, 16)
    assert calls == [1, 1]
    assert all(torch.equal(x, y) for x, y in zip(t1, t2))
    torch.testing.assert_close(t1.s, full_svd(a, 16).s, rtol=1e-4, atol=1e-6)


def test_auto_falls_back_to_full_svd_when_randomized_does_not_converge(monkeypatch):
    a = decaying(512, 300)

    def unconverged(w, rank, *args, **kw):
        t, _ = real(w, rank, max_iter=0)  # no power iteration: a poor basis
        return t, False

    real = svd_mod.randomized_svd
    monkeypatch.setattr(svd_mod, "randomized_svd", unconverged)
    assert triplet_residual(a, top_svd(a, 16)) < 1e-5
    assert triplet_residual(a, top_svd(a, 16, method="randomized")) > 1e-3  # forced: the poor result is kept


def test_randomized_is_near_optimal_on_a_bf16_fine_tuning_update():
    """Power-law spectrum plus bf16 rounding noise (flat spectrum), as in a real fine-tuned checkpoint."""
    g = torch.Generator().manual_seed(0)
    w0 = 0.02 * torch.randn(384, 768, generator=g)
    dw = decaying(384, 768, decay=0.99) * 2e-3
    d = (w0 + dw).bfloat16().float() - w0.bfloat16().float()
    rec = lambda t: (t.u * t.s) @ t.v.T  # noqa: E731
    for rank in (8, 64):
        optimal = torch.linalg.norm(d - rec(full_svd(d, rank)))
        assert torch.linalg.norm(d - rec(top_svd(d, rank))) / optimal < 1.002


def test_null_directions_are_zeroed_for_reproducible_routers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g)  # rank 2
    t = top_svd(a, 6)
    assert torch.count_nonzero(t.s) == 2
    assert torch.count_nonzero(t.v[:, 2:]) == 0 and torch.count_nonzero(t.u[:, 2:]) == 0
    zero = top_svd(torch.zeros(5, 4), 3)
    assert torch.count_nonzero(zero.u) == torch.count_nonzero(zero.v) == 0


@pytest.mark.parametrize("rank", [0, 21])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=r"rank must be in \[1, 20\]"):
        top_svd(torch.randn(30, 20), rank)
