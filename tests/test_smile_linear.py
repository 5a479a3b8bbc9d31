"""SmileLinear: routing, batched experts vs a per-token reference, exact reproduction, FusionBench oracle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench_pave.smile.decompose import smile_tensors
from fusion_bench_pave.smile.linear import SmileLinear, smile_layout
from reference.smile_forward import naive_forward


def layer_family(m: int = 24, n: int = 16, t: int = 3, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=g)
    b0 = torch.randn(m, generator=g) if bias else None
    ws = [w0 + 0.1 * torch.randn(m, n, generator=g) for _ in range(t)]
    bs = [b0 + 0.1 * torch.randn(m, generator=g) if bias else None for _ in range(t)]
    return w0, b0, ws, bs


def smile_layer(w0, b0, ws, bs, gate_k, k, top_k, routing_use_diff=True) -> SmileLinear:
    layer = SmileLinear(w0.shape[1], w0.shape[0], len(ws), gate_k, k, top_k, bias=b0 is not None)
    layer.load_state_dict(smile_tensors(w0, ws, b0, bs, gate_k, k, routing_use_diff))
    return layer


@pytest.mark.parametrize("k", [4, 0])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_parameters_and_decomposition_follow_the_one_layout(k, bias):
    experts = {"expert_u": (3, 24, k), "expert_svh": (3, k, 16)} if k > 0 else {"expert_weight": (3, 24, 16)}
    expected = {"weight": (24, 16), "router": (3, 2, 16), **experts, **({"bias": (24,), "expert_bias": (3, 24)} if bias else {})}
    layout = smile_layout(16, 24, 3, 2, k, bias)
    assert list(layout.items()) == list(expected.items())
    layer = SmileLinear(16, 24, 3, 2, k, bias=bias)
    assert {name: tuple(p.shape) for name, p in layer.state_dict().items()} == layout
    w0, b0, ws, bs = layer_family(bias=bias)
    assert [(name, tuple(t.shape)) for name, t in smile_tensors(w0, ws, b0, bs, 2, k).items()] == list(layout.items())


@pytest.mark.parametrize("k", [4, 0])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_batched_forward_equals_reference(k, top_k, bias):
    layer = smile_layer(*layer_family(bias=bias), gate_k=3, k=k, top_k=top_k)
    x = torch.randn(4, 11, 16)
    with torch.no_grad():
        # the layer's own routing, so this compares the batched experts alone
        torch.testing.assert_close(layer(x), naive_forward(layer, x, routing=SmileLinear.routing), rtol=1e-5, atol=1e-5)


def test_routing_weights_sum_to_one_and_follow_router_norms():
    layer = smile_layer(*layer_family(t=4), gate_k=2, k=4, top_k=3)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    weights, selected = layer.routing(x)
    assert weights.shape == selected.shape == (50, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    assert (weights > 0).all() and (weights[:, :-1] >= weights[:, 1:]).all()
    # recomputed per expert (the layer does one GEMM over all experts), so equal only to rounding: compare
    # the selected experts' scores with the top three, which a near-tie between experts cannot upset
    logits = torch.stack([torch.linalg.vector_norm(x @ layer.router[i].T, dim=-1) for i in range(4)], dim=-1)
    torch.testing.assert_close(logits.gather(1, selected), logits.topk(3, dim=-1).values, rtol=1e-6, atol=1e-6)
    single = smile_layer(*layer_family(t=1), gate_k=2, k=4, top_k=1)
    w1, s1 = single.routing(x)
    assert torch.equal(w1, torch.ones(50, 1)) and torch.equal(s1, torch.zeros(50, 1, dtype=torch.long))


@pytest.mark.parametrize("k", [16, 0])
def test_top1_full_rank_expert_reproduces_the_finetuned_layer(k):
    w0, b0, ws, bs = layer_family(m=24, n=16, t=3)
    layer = smile_layer(w0, b0, ws, bs, gate_k=4, k=k, top_k=1)  # rank(dW) <= 16 = min(m, n)
    x = torch.randn(64, 16)
    _, selected = layer.routing(x)
    assert len(selected.unique()) > 1  # several experts are actually exercised
    expected = torch.stack([F.linear(x[i], ws[e], bs[e]) for i, e in enumerate(selected[:, 0].tolist())])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_zero_router_and_experts_equal_the_pretrained_layer():
    layer = SmileLinear(16, 24, num_experts=3, gate_k=2, k=4, top_k=2)
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_gradients_reach_router_free_parameters():
    layer = smile_layer(*layer_family(), gate_k=2, k=4, top_k=2)
    layer(torch.randn(5, 16)).sum().backward()
    assert layer.expert_u.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=0), "at least one expert"),
        (dict(top_k=4), r"top_k must be in \[1, 3\]"),
        (dict(gate_k=17), r"gate_k must be in \[1, 16\]"),
        (dict(k=17), r"k must be <= 16"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = dict(in_features=16, out_features=24, num_experts=3, gate_k=2, k=4, top_k=1) | kwargs
    with pytest.raises(ValueError, match=match):
        SmileLinear(**args)


@pytest.mark.parametrize(
    "gate_k, k, routing_use_diff, top_k",
    [(2, 4, True, 1), (4, 16, True, 2), (3, 0, True, 2), (2, 6, False, 3)],
)
def test_equals_fusion_bench_smile_moe_linear(gate_k, k, routing_use_diff, top_k):
    from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear

    w0, b0, ws, bs = layer_family()
    ours = smile_layer(w0, b0, ws, bs, gate_k, k, top_k, routing_use_diff)
    base = nn.Linear(16, 24)
    base.load_state_dict({"weight": w0, "bias": b0})
    experts = []
    for w, b in zip(ws, bs):
        e = nn.Linear(16, 24)
        e.load_state_dict({"weight": w, "bias": b})
        experts.append(e)
    fb = SmileMoELinear(copy.deepcopy(base), copy.deepcopy(experts), gate_k=gate_k, k=k, top_k=top_k, routing_use_diff=routing_use_diff)
    x = torch.randn(3, 20, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), fb(x), rtol=1e-5, atol=1e-5)
