"""``SmileLinear``: a pretrained linear layer plus a router over T low-rank (or dense) experts.

    y = W0 x + b0 + sum_{i in top_k(x)} w_i(x) * (U_i (S_i V_i^T x) + db_i)

The router scores expert i by ``||G_i x||_2`` where the rows of ``G_i`` [g, n] are the leading
right singular vectors of ``dW_i``; softmax over experts, keep top_k, renormalise. Experts are
stacked tensors evaluated with two batched matmuls over capacity-padded token groups, so the
forward has no Python loop over experts and only the selected experts do work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SmileLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with ``num_experts`` routed experts.

    Parameters (state-dict keys): ``weight``/``bias`` (the pretrained layer, same names as
    ``nn.Linear`` so a base checkpoint loads into it), ``router`` [T, g, n], and either
    ``expert_u`` [T, m, k] + ``expert_svh`` [T, k, n] (``k > 0``) or ``expert_weight`` [T, m, n]
    (``k <= 0``, dense experts), plus ``expert_bias`` [T, m] when the layer has a bias.
    Freshly constructed experts and router are zero, i.e. the layer equals its pretrained part.
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
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, **fk)) if bias else None)
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.router = nn.Parameter(torch.zeros(num_experts, gate_k, in_features, **fk))
        if k > 0:
            self.expert_u = nn.Parameter(torch.zeros(num_experts, out_features, k, **fk))
            self.expert_svh = nn.Parameter(torch.zeros(num_experts, k, in_features, **fk))
        else:
            self.expert_weight = nn.Parameter(torch.zeros(num_experts, out_features, in_features, **fk))
        self.register_parameter("expert_bias", nn.Parameter(torch.zeros(num_experts, out_features, **fk)) if bias else None)

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Routing weights [N, top_k] (rows sum to 1) and selected expert ids [N, top_k] for tokens x [N, n]."""
        n_tok = x.shape[0]
        if self.num_experts == 1:
            return x.new_ones(n_tok, 1), torch.zeros(n_tok, 1, dtype=torch.long, device=x.device)
        logits = F.linear(x, self.router.reshape(-1, self.in_features))
        logits = logits.view(n_tok, self.num_experts, self.gate_k).norm(p=2, dim=-1)
        weights, selected = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), selected

    def _expert_outputs(self, groups: Tensor) -> Tensor:
        """Expert i (without bias) applied to ``groups[i]`` [C, n] for all i at once -> [T, C, m]."""
        if self.k > 0:
            return torch.bmm(torch.bmm(groups, self.expert_svh.transpose(1, 2)), self.expert_u.transpose(1, 2))
        return torch.bmm(groups, self.expert_weight.transpose(1, 2))

    def forward(self, hidden_states: Tensor) -> Tensor:
        out = F.linear(hidden_states, self.weight, self.bias)
        x = hidden_states.reshape(-1, self.in_features)
        weights, selected = self.routing(x)
        # group the (token, slot) pairs by expert into a [T, capacity, n] batch; padding rows are
        # never read back, so they may hold garbage
        flat = selected.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        capacity = int(counts.max())
        expert_of = flat[order]
        rows = torch.arange(flat.numel(), device=x.device) + expert_of * capacity - (torch.cumsum(counts, 0) - counts)[expert_of]
        tokens = order // self.top_k
        groups = x.new_empty(self.num_experts * capacity, self.in_features)
        groups.index_copy_(0, rows, x.index_select(0, tokens))
        outputs = self._expert_outputs(groups.view(self.num_experts, capacity, -1)).view(-1, self.out_features)
        picked = outputs.index_select(0, rows)
        if self.expert_bias is not None:
            picked = picked + self.expert_bias.index_select(0, expert_of)
        contributions = picked * weights.reshape(-1)[order, None].to(picked.dtype)
        return out.view(-1, self.out_features).index_add_(0, tokens, contributions).view(out.shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"num_experts={self.num_experts}, gate_k={self.gate_k}, k={self.k}, top_k={self.top_k}"
        )
