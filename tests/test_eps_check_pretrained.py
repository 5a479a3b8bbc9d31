"""eps_check_pretrained: the official ViT/GLUE second pass doubles eps until the residual
||C^-1 C - I||_F of the fine-tuned C plus that of the PRETRAINED model's C (same calibration inputs)
is below eps_tol, while its rank search keeps the eps of the fine-tuned C alone."""

from __future__ import annotations

import pytest
import torch
from pave_helpers import make_pool

from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.covariance import CovarianceStats
from fusion_bench_pave.pave.models import LinearWeights
from fusion_bench_pave.pave.purification import PurifySettings, RegularizedCovariances, purify
from fusion_bench_pave.pave.regularize import regularize
from reference.official_pave import greedy_trim

D_IN, D_OUT, ROWS, EPS0, TOL, RHO = 12, 10, 64, 0.1, 5e-2, 0.75
TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}


def official_eps(covs: list[torch.Tensor]) -> float:
    """The official loop, written out: eps0 doubled until the float32 inverse residuals, summed, are < TOL."""
    eye = torch.eye(D_IN)
    eps = EPS0
    while True:
        regs = [(c + eps * torch.eye(D_IN, dtype=c.dtype)).float() for c in covs]
        if sum(float(torch.norm(torch.inverse(r) @ r - eye)) for r in regs) < TOL:
            return eps
        eps *= 2


def stats_of(cov: torch.Tensor) -> CovarianceStats:
    return CovarianceStats(xtx={"l": cov * ROWS}, count={"l": ROWS}, input_of={"l": "l"})


def constructed() -> tuple[dict, dict, dict]:
    """Two tasks with well-conditioned fine-tuned Cs; task a's pretrained C spans eigenvalues 1e-6..1e5,
    whose float32 inverse fails the check at eps0, task b's is well conditioned."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    ill = q @ torch.diag(torch.logspace(-6, 5, D_IN, dtype=torch.float64)) @ q.T
    finetuned, pretrained, weights = {}, {}, {}
    for task in "ab":
        x = torch.randn(ROWS, D_IN, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, D_IN, dtype=torch.float64)
        finetuned[task] = stats_of(x.T @ x / ROWS)
        y = torch.randn(ROWS, D_IN, generator=g, dtype=torch.float64)
        pretrained[task] = stats_of(ill if task == "a" else y.T @ y / ROWS)
        weights[task] = {"l": torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)}
    return finetuned, pretrained, weights


@pytest.mark.parametrize("allocation", ["per_layer", "per_model"])
def test_ranks_from_the_finetuned_eps_projection_from_the_eps_checked_on_both(allocation):
    finetuned, pretrained, weights = constructed()
    covs = {t: finetuned[t].covariance("l") for t in "ab"}
    eps_ft = {t: official_eps([covs[t]]) for t in "ab"}
    eps_both = {t: official_eps([covs[t], pretrained[t].covariance("l")]) for t in "ab"}
    assert eps_ft == {"a": EPS0, "b": EPS0}  # the fine-tuned Cs pass at eps0 ...
    assert eps_both["a"] >= 4 * EPS0 and eps_both["b"] == EPS0  # ... task a's pretrained C needs doubling

    settings = PurifySettings(rho=RHO, allocation=allocation, eps0=EPS0, eps_tol=TOL)
    checked = RegularizedCovariances(finetuned, settings, pretrained)
    assert {t: checked.eps_of(t, "l") for t in "ab"} == eps_both
    assert {t: RegularizedCovariances(finetuned, settings).eps_of(t, "l") for t in "ab"} == eps_ft

    # oracle: official pass 1 (spectra of W (C + eps_ft I), greedy) and pass 2 (float64 inverse form at eps_both)
    spectra = {}
    for t in "ab":
        s = torch.linalg.svdvals(weights[t]["l"] @ (covs[t] + eps_ft[t] * torch.eye(D_IN, dtype=torch.float64)))
        spectra[t] = s / s.max()
    ranks = greedy_trim(spectra, D_OUT, RHO)
    assert sum(ranks.values()) == 14  # drops while kept/20 >= 0.75

    def inverse_form(t: str, eps: float) -> torch.Tensor:
        reg = covs[t] + eps * torch.eye(D_IN, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(weights[t]["l"] @ reg, full_matrices=False)
        r = ranks[t]
        return u[:, :r] @ torch.diag(s[:r]) @ vh[:r] @ torch.linalg.inv(reg)

    purified, got_ranks, _ = purify(weights, finetuned, settings, pretrained_statistics=pretrained)
    assert {t: got_ranks[t]["l"] for t in "ab"} == ranks
    for t in "ab":
        torch.testing.assert_close(purified[t]["l"], inverse_form(t, eps_both[t]), rtol=0, atol=1e-10)
    # the check matters: task a at the fine-tuned eps alone is another weight (what the key off gives)
    assert float((inverse_form("a", eps_ft["a"]) - purified["a"]["l"]).abs().max()) > 1e-2
    plain, plain_ranks, _ = purify(weights, finetuned, settings)
    assert plain_ranks == got_ranks
    torch.testing.assert_close(plain["a"]["l"], inverse_form("a", eps_ft["a"]), rtol=0, atol=1e-10)
    assert torch.equal(plain["b"]["l"], purified["b"]["l"])


def test_relative_rule_refuses_a_joint_check():
    cov = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="regularization=doubling"):
        regularize(cov, "relative", EPS0, TOL, 1e-3, also=[cov])


def test_pave_run_collects_the_pretrained_statistics_and_purifies_with_them(tmp_path):
    algorithm = PAVE(merger=TA, rho=0.8, num_samples=12, batch_size=4, eps0=1e-6, eps_check_pretrained=True,
                     cache_dir=str(tmp_path / "cache"))
    merged = algorithm.run(make_pool("clip"))
    assert algorithm.extras["eps_check_pretrained"] is True

    # oracle: the statistics of each fine-tuned model and of the pretrained model on each task's inputs
    pool = make_pool("clip")
    pretrained = pool.load_pretrained_model()
    finetuned = {t: pool.load_model(t) for t in pool.model_names}
    stats = {t: algorithm.task_covariance(pool, t, m) for t, m in finetuned.items()}
    reference = {t: algorithm.task_covariance(pool, t, pretrained) for t in finetuned}
    layer = stats["task0"].layers[0]
    assert not torch.equal(stats["task0"].covariance(layer), reference["task0"].covariance(layer))
    coupled = RegularizedCovariances(stats, algorithm.purification, reference)
    alone = RegularizedCovariances(stats, algorithm.purification)
    raised = [(t, l) for t in stats for l in stats[t].layers if coupled.eps_of(t, l) != alone.eps_of(t, l)]
    assert len(raised) >= 12  # at eps0 = 1e-6 the pretrained C raises eps of 24 of the 36 (task, layer) inputs
    assert all(coupled.eps_of(t, l) > alone.eps_of(t, l) for t, l in raised)
    weights = {t: LinearWeights(m) for t, m in finetuned.items()}
    expected, ranks, _ = purify(weights, stats, algorithm.purification, pretrained_statistics=reference)
    assert ranks == algorithm.extras["ranks"]
    base = pretrained.state_dict()
    for layer in algorithm.extras["full_ranks"]:
        key = f"{layer}.weight"
        want = base[key] + 0.3 * sum(expected[t][layer] - base[key] for t in finetuned)
        torch.testing.assert_close(merged["model"].state_dict()[key], want, rtol=1e-5, atol=1e-6)

    again = PAVE(merger=TA, rho=0.8, num_samples=12, batch_size=4, eps0=1e-6, eps_check_pretrained=True,
                 cache_dir=str(tmp_path / "cache"))
    again.run(make_pool("clip"))  # both kinds of statistics come from the cache
    assert sorted(again.extras["covariance_cache_hits"]) == sorted(
        [f"task{i}" for i in range(3)] + [f"task{i} (pretrained)" for i in range(3)])


@pytest.mark.parametrize("keys, message", [
    ({"regularization": "relative"}, "regularization=doubling"),
    ({"statistics": "/nonexistent"}, "statistics=null"),
])
def test_pave_refuses_eps_check_pretrained_where_it_cannot_apply(keys, message):
    with pytest.raises(ValueError, match=message):
        PAVE(merger=TA, rho=0.8, eps_check_pretrained=True, **keys).run(make_pool("clip"))


def test_streamed_causal_lm_refuses_it_with_the_reason():
    from fusion_bench_pave.pave.causal_lm_algorithm import PAVECausalLM

    with pytest.raises(TypeError, match="does not support 'eps_check_pretrained': the official LLM path"):
        PAVECausalLM(merger=TA, eps_check_pretrained=True)
