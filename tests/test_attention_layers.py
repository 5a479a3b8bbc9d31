"""nn.MultiheadAttention's inputs for PAVE (fusion_bench_pave.attention_layers), with torch alone:
the out_proj route leaves the output unchanged, hooks come off, inputs of an MHA that is not
batch_first line up with token masks, and the packed q/k/v rows are read and written in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusion_bench_pave.attention_layers import attention_layer_names, route_out_proj
from fusion_bench_pave.pave.covariance import collect_covariance
from fusion_bench_pave.pave.models import LinearWeights


class Block(nn.Module):
    """Self-attention then a Linear, fed [batch, seq, d] whatever the MHA's layout."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.attn.batch_first else x.transpose(0, 1)
        z = self.attn(x, x, x, need_weights=False)[0]
        return self.fc(z if self.attn.batch_first else z.transpose(0, 1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_routed_out_proj_keeps_the_output_and_is_removed(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 8)
    seen = []
    mha.out_proj.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        reference = mha(x, x, x, need_weights=False)[0]
        handle = route_out_proj(mha)
        routed = mha(x, x, x, need_weights=False)[0]
        handle.remove()
        after = mha(x, x, x, need_weights=False)[0]
    # the slow path's out_proj is linear(z, W, b) on the same z: same op, same result
    assert torch.equal(routed, reference) and torch.equal(after, reference)
    assert len(seen) == 1 and seen[0].shape == ((3, 5, 8) if batch_first else (5, 3, 8))  # batch first always
    assert "forward" not in mha.__dict__ and isinstance(mha.out_proj, nn.Linear)


def test_inputs_of_an_mha_that_is_not_batch_first_line_up_with_token_masks():
    torch.manual_seed(0)
    first = Block(batch_first=True)
    second = Block(batch_first=False)
    second.load_state_dict(first.state_dict())
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    a, b = (collect_covariance(m, [((x,), mask)], attention=True) for m in (first, second))
    layers = ["attn.in_proj_q", "attn.in_proj_k", "attn.in_proj_v", "attn.out_proj", "fc"]
    assert a.layers == b.layers == layers
    assert a.input_of["attn.in_proj_k"] == a.input_of["attn.in_proj_v"] == "attn.in_proj_q"  # one input, one sum
    assert a.count["attn.in_proj_q"] == a.count["attn.out_proj"] == 8  # the 8 real tokens
    manual = x[mask].double().T @ x[mask].double() / 8
    torch.testing.assert_close(a.covariance("attn.in_proj_q"), manual, rtol=1e-12, atol=1e-12)  # float64 sums, other order
    for layer in layers:
        # the same weights on transposed inputs: equal up to float32 rounding of the attention kernels
        torch.testing.assert_close(a.covariance(layer), b.covariance(layer), rtol=1e-5, atol=1e-6)
    assert collect_covariance(first, [((x,), mask)]).layers == ["fc"]  # out_proj never ran, so never hooked


def test_linear_weights_read_and_write_the_packed_rows_in_place():
    model = Block(batch_first=True)
    packed = model.attn.in_proj_weight
    weights = LinearWeights(model, attention=True)
    assert list(weights) == ["attn.out_proj", "fc", "attn.in_proj_q", "attn.in_proj_k", "attn.in_proj_v"]
    assert set(attention_layer_names(model)) == {"attn.in_proj_q", "attn.in_proj_k", "attn.in_proj_v", "attn.out_proj"}
    assert torch.equal(weights["attn.in_proj_k"], packed[8:16])
    before = packed.detach().clone()
    weights.write("attn.in_proj_k", torch.ones(8, 8))
    assert model.attn.in_proj_weight is packed  # written into the parameter itself
    assert torch.equal(packed[8:16], torch.ones(8, 8))
    assert torch.equal(packed[:8], before[:8]) and torch.equal(packed[16:], before[16:])
    assert list(LinearWeights(model)) == ["fc"]  # without attention: out_proj is not a layer either


def test_separate_qkv_weights_are_refused_by_name():
    model = nn.Module()
    model.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    with pytest.raises(ValueError, match=r"'cross' has separate q/k/v weights.*purify_attention=false"):
        LinearWeights(copy.deepcopy(model), attention=True)
