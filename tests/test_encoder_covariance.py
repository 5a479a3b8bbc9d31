"""PAVE's padding mask on BERT-family encoders: each Linear's statistics equal a hand computation that
hooks the Linear and selects its rows by hand (real tokens of the token stream; every row of the
pooler / RoBERTa head input, one per sequence; every row of DeBERTa's relative-position embeddings)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_bench_pave.pave.covariance import collect_covariance
from reference.tiny_models import encoder

LENGTHS = [[5, 9, 3], [7, 2, 7], [1]]  # real tokens per sequence, per batch (the last one: a batch of one)


def batches(model: nn.Module) -> list[tuple[dict, torch.Tensor]]:
    """Right-padded batches of random token ids with their attention masks."""
    generator = torch.Generator().manual_seed(0)
    pad, vocab = model.config.pad_token_id, model.config.vocab_size
    out = []
    for lengths in LENGTHS:
        mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        ids = torch.randint(3, vocab, mask.shape, generator=generator).masked_fill(~mask, pad)
        out.append(({"input_ids": ids, "attention_mask": mask.long()}, mask))
    return out


@torch.no_grad()
def hand_statistics(model: nn.Module, data: list[tuple[dict, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, int]]:
    """{Linear: (sum of x^T x, rows)} over every call, rows chosen by hand from the input's shape."""
    sums: dict[str, list] = {}
    mask = None

    def hook(name):
        def record(module, args, output):
            x = args[0].double()
            rows = x[mask] if x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])
            total = sums.setdefault(name, [0, 0])
            total[0] = total[0] + rows.T @ rows
            total[1] += rows.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        for inputs, mask in data:
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (xtx, n) for name, (xtx, n) in sums.items()}


ARCHITECTURES = {  # kind -> a Linear reading one row per sequence (the first token)
    "bert": "bert.pooler.dense",
    "roberta": "classifier.dense",
    "deberta-v2": "pooler.dense",
}


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_masked_statistics_equal_a_hand_computation(kind):
    model = encoder(kind, num_labels=3)
    data = batches(model)
    stats = collect_covariance(model, data)
    hand = hand_statistics(model, data)
    assert set(stats.layers) == set(hand)
    real_tokens = sum(map(sum, LENGTHS))
    sequences = sum(map(len, LENGTHS))
    for layer, (xtx, n) in hand.items():
        key = stats.input_of[layer]
        assert stats.count[key] == n, layer
        # float64 sums of the same rows in another order (block GEMMs vs one product per call): a few ulp
        torch.testing.assert_close(stats.covariance(layer), xtx / n, rtol=1e-12, atol=1e-14)
    assert stats.count[stats.input_of[ARCHITECTURES[kind]]] == sequences  # one row per sequence, all real
    intermediate = [layer for layer in hand if layer.endswith("intermediate.dense")]
    assert intermediate and all(stats.count[stats.input_of[layer]] == real_tokens for layer in intermediate)
    if kind == "deberta-v2":  # query/key also read 2 * position_buckets relative-position rows per forward
        block = "deberta.encoder.layer.0.attention.self"
        relative = len(LENGTHS) * 2 * model.config.position_buckets
        assert stats.count[stats.input_of[f"{block}.query_proj"]] == real_tokens + relative
        assert stats.input_of[f"{block}.query_proj"] == stats.input_of[f"{block}.key_proj"]  # one shared sum
        assert stats.count[stats.input_of[f"{block}.value_proj"]] == real_tokens


def test_padding_changes_nothing_on_an_encoder():
    """The same sequences, batched together (padded) or one by one (no padding): same statistics."""
    model = encoder("roberta", num_labels=2)
    data = batches(model)
    single = [({k: v[i : i + 1, : int(m[i].sum())] for k, v in inputs.items()}, m[i : i + 1, : int(m[i].sum())])
              for inputs, m in data for i in range(len(m))]
    batched, alone = collect_covariance(model, data), collect_covariance(model, single)
    for layer in batched.layers:
        assert batched.count[batched.input_of[layer]] == alone.count[alone.input_of[layer]]
        # padded keys get a large negative attention bias, not exactly -inf: float32 noise only
        torch.testing.assert_close(batched.covariance(layer), alone.covariance(layer), rtol=1e-5, atol=1e-6)


class Window(nn.Module):
    """Reads the first two tokens of every sequence: neither the token stream nor one row per sequence."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x[:, :2])


def test_an_input_the_mask_cannot_cover_is_an_error_naming_the_linear():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with pytest.raises(ValueError, match=r"Linear 'proj' received input of shape \(2, 2, 4\).*mask_padding=false"):
        collect_covariance(Window(), [({"x": torch.randn(2, 3, 4)}, mask)])
