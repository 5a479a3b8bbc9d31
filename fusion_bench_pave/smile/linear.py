"""``SmileLinear``: a pretrained linear layer plus a router over T low-rank (or dense) experts.

    y = W0 x + b0 + sum_{i in top_k(x)} w_i(x) * (U_i (S_i V_i^T x) + db_i)

The router scores expert i by ``||G_i x||_2`` where the rows of ``G_i`` [g, n] are the leading
right singular vectors of ``dW_i``; softmax over experts, keep top_k, renormalise. The (token,
slot) pairs are sorted by expert once; each expert with tokens then takes two small matmuls on
its contiguous slice (routing weight folded into the rank-k activations, expert bias as one extra
column) and adds into the pretrained output in place. Only the selected experts do work and no
intermediate beyond one expert's slice is materialised: gathering all top_k * N input rows at once
made one allocation above glibc's 32 MB mmap ceiling at FFN widths, page-faulted afresh on every
call (768x3072, top-2, 1600 tokens: 81 -> 61 ms; benchmarks/results/perf_smile_notes.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def smile_layout(in_features: int, out_features: int, num_experts: int, gate_k: int, k: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of one SMILE layer, in the order they are stored: ``weight``
    [m, n], ``router`` [T, g, n], either ``expert_u`` [T, m, k] + ``expert_svh`` [T, k, n]
    (``k > 0``) or ``expert_weight`` [T, m, n] (``k <= 0``, dense experts), then ``bias`` [m] and
    ``expert_bias`` [T, m] when the layer has a bias. ``weight``/``bias`` are the pretrained layer,
    named as in ``nn.Linear`` so a base checkpoint loads into it."""
    m, n, t = out_features, in_features, num_experts
    layout = {"weight": (m, n), "router": (t, gate_k, n)}
    layout |= {"expert_u": (t, m, k), "expert_svh": (t, k, n)} if k > 0 else {"expert_weight": (t, m, n)}
    return layout | ({"bias": (m,), "expert_bias": (t, m)} if bias else {})


class SmileLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with ``num_experts`` routed experts; its parameters are
    ``smile_layout``'s. Freshly constructed experts and router are zero, i.e. the layer equals its
    pretrained part.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        gate_k: int,
        k: int,
        top_k: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"SmileLinear needs at least one expert, got num_experts={num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}] (num_experts), got {top_k}")
        max_rank = min(in_features, out_features)
        if not 1 <= gate_k <= max_rank:
            raise ValueError(f"gate_k must be in [1, {max_rank}] (min(in, out) = min({in_features}, {out_features})), got {gate_k}")
        if k > max_rank:
            raise ValueError(f"k must be <= {max_rank} (min(in, out) = min({in_features}, {out_features})) or <= 0 for dense experts, got {k}")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.gate_k, self.k, self.top_k = num_experts, gate_k, k, top_k
        if not bias:
            self.register_parameter("bias", None)
            self.register_parameter("expert_bias", None)
        for name, shape in smile_layout(in_features, out_features, num_experts, gate_k, k, bias).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Routing weights [N, top_k] (rows sum to 1) and selected expert ids [N, top_k] for tokens x [N, n]."""
        n_tok = x.shape[0]
        if self.num_experts == 1:
            return x.new_ones(n_tok, 1), torch.zeros(n_tok, 1, dtype=torch.long, device=x.device)
        logits = F.linear(x, self.router.reshape(-1, self.in_features))
        logits = logits.view(n_tok, self.num_experts, self.gate_k).norm(p=2, dim=-1)
        weights, selected = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), selected

    def _expert_output(self, expert: int, x: Tensor, weights: Tensor) -> Tensor:
        """weights * (expert(x) + bias) for tokens x [c, n] routed to `expert` with weights [c, 1]."""
        if self.k > 0:
            h = (x @ self.expert_svh[expert].T).mul_(weights)
            if self.expert_bias is None:
                return h @ self.expert_u[expert].T
            u_and_bias = torch.cat([self.expert_u[expert], self.expert_bias[expert].unsqueeze(1)], dim=1)
            return torch.cat([h, weights], dim=1) @ u_and_bias.T
        y = x @ self.expert_weight[expert].T
        if self.expert_bias is not None:
            y = y.add_(self.expert_bias[expert])
        return y.mul_(weights)

    def forward(self, hidden_states: Tensor) -> Tensor:
        out = F.linear(hidden_states, self.weight, self.bias)
        x = hidden_states.reshape(-1, self.in_features)
        weights, selected = self.routing(x)
        flat = selected.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        grouped_weights = weights.reshape(-1).index_select(0, order).unsqueeze(1).to(x.dtype)
        flat_out = out.view(-1, self.out_features)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                expert_tokens = tokens[rows]
                expert_out = self._expert_output(expert, x.index_select(0, expert_tokens), grouped_weights[rows])
                flat_out.index_add_(0, expert_tokens, expert_out)
                start += count
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"num_experts={self.num_experts}, gate_k={self.gate_k}, k={self.k}, top_k={self.top_k}"
        )
