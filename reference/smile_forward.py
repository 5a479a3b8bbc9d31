"""SMILE's forward, token by token and expert by expert: the formula, with nothing batched."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fusion_bench_pave.smile import SmileLinear


def naive_routing(layer: SmileLinear, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per token: softmax over experts of ``||G_i x||``, the top_k experts, weights renormalised."""
    if layer.num_experts == 1:
        return torch.ones(len(tokens), 1, dtype=tokens.dtype), torch.zeros(len(tokens), 1, dtype=torch.long)
    weights, chosen = [], []
    for token in tokens:
        scores = torch.stack([torch.linalg.vector_norm(g @ token) for g in layer.router]).softmax(0)
        top = torch.topk(scores, layer.top_k)
        weights.append(top.values / top.values.sum())
        chosen.append(top.indices)
    return torch.stack(weights), torch.stack(chosen)


def naive_forward(layer: SmileLinear, x: Tensor,
                  routing: Callable[[SmileLinear, Tensor], tuple[Tensor, Tensor]] = naive_routing) -> Tensor:
    """y = W0 x + b0 + sum over the routed experts of w_i (dW_i x + db_i), one token at a time;
    ``routing(layer, tokens)`` gives the weights and expert ids [N, top_k]."""
    tokens = x.reshape(-1, layer.in_features)
    weights, chosen = routing(layer, tokens)
    rows = []
    for token, token_weights, token_experts in zip(tokens, weights, chosen):
        y = layer.weight @ token + (layer.bias if layer.bias is not None else 0)
        for w, i in zip(token_weights, token_experts):
            delta = layer.expert_u[i] @ (layer.expert_svh[i] @ token) if layer.k > 0 else layer.expert_weight[i] @ token
            if layer.expert_bias is not None:
                delta = delta + layer.expert_bias[i]
            y = y + w * delta
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], layer.out_features)
