"""SMILE's per-layer rules: gate_k and k clamped to each layer's full rank (decompose.layer_ranks),
and task heads left pretrained unless target_modules names them."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench_pave.smile import SmileLinear, upscale_model
from fusion_bench_pave.smile.algorithm import SmileUpscalingAlgorithm
from fusion_bench_pave.smile.decompose import layer_ranks, smile_tensors
from reference.tiny_models import bert, decoder, noisy_copies


def test_layer_ranks_rule():
    assert layer_ranks((3, 32), 4, 128) == (3, 3)  # a 3-row classifier: full rank 3
    assert layer_ranks((16, 32), 8, 24) == (8, 16)
    assert layer_ranks((64, 32), 8, 0) == (8, 0)  # dense experts stay dense
    assert layer_ranks((64, 32), 8, -1) == (8, -1)
    assert layer_ranks((64, 32), 0, 4) == (0, 4)  # left for check_layer_inputs to refuse


@torch.no_grad()
def test_a_sequence_classifier_upscales_with_the_default_settings():
    from transformers import BertConfig, BertForSequenceClassification

    from reference.tiny_models import BERT

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**BERT, num_labels=2)).eval()
    finetuned = noisy_copies(base, 2)  # heads included: each task trained its own
    pool = {"_pretrained_": copy.deepcopy(base), **{f"m{i}": m for i, m in enumerate(finetuned)}}
    model = SmileUpscalingAlgorithm().run(pool)  # gate_k=1, k=128 on layers 32..64 wide
    assert type(model.classifier) is nn.Linear and torch.equal(model.classifier.weight, base.classifier.weight)
    smile = {name: m for name, m in model.named_modules() if isinstance(m, SmileLinear)}
    assert len(smile) == 2 * 6 + 1  # q, k, v, o, up, down per layer and the pooler (part of the body)
    assert all(m.gate_k == 1 and m.k == min(m.in_features, m.out_features) for m in smile.values())


@pytest.fixture(scope="module")
def gqa_family():
    base = decoder("mistral", sliding_window=None)  # 4 query heads, 2 key/value heads of 8: k/v_proj are 16 x 32
    return base, noisy_copies(base, 3, skip=r"lm_head|embed")


@torch.no_grad()
def test_grouped_query_attention_clamps_the_narrow_layers_as_explicit_settings_would(gqa_family, caplog):
    base, finetuned = gqa_family
    with caplog.at_level(logging.INFO, logger="fusion_bench_pave.smile.upscale"):
        model, report = upscale_model(copy.deepcopy(base), finetuned, gate_k=20, k=24, top_k=2, progress=False)
    assert report.heads == ["lm_head"] and "lm_head" not in report.kept_pretrained  # lm_head unchanged here
    assert report.ranks["model.layers.0.self_attn.k_proj"] == (16, 16)
    assert report.ranks["model.layers.0.self_attn.q_proj"] == (20, 24)
    assert "model.layers.0.self_attn.v_proj (16, 16)" in caplog.text
    for name in report.upscaled:
        w0 = base.get_submodule(name).weight
        full = min(w0.shape)
        explicit = (min(20, full), min(24, full))  # what a user would have to set for this layer alone
        assert report.ranks[name] == explicit
        layer = model.get_submodule(name)
        assert (layer.gate_k, layer.k) == explicit
        expected = smile_tensors(w0, [m.get_submodule(name).weight for m in finetuned], None, [None] * 3, *explicit)
        state = layer.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[key], value) for key, value in expected.items())


class Classifier(nn.Module):
    """Not a Hugging Face model: its head is found as its output embeddings."""

    def __init__(self):
        super().__init__()
        self.body, self.classifier = bert(pooler=False), nn.Linear(32, 3)

    def get_output_embeddings(self) -> nn.Module:
        return self.classifier


def test_named_heads_are_upscaled_and_changed_heads_are_reported(caplog):
    base = Classifier()
    finetuned = noisy_copies(base, 2, only=r"classifier|intermediate")
    with caplog.at_level(logging.WARNING):
        _, report = upscale_model(copy.deepcopy(base), finetuned, gate_k=2, k=4, progress=False)
    assert report.heads == ["classifier"] and report.kept_pretrained == {"classifier": "Linear"}
    assert "Linear x1 (classifier)" in caplog.text
    _, report = upscale_model(copy.deepcopy(base), finetuned, gate_k=2, k=4, target_modules=[".*"], progress=False)
    assert "classifier" in report.upscaled and report.ranks["classifier"] == (2, 3) and not report.heads


def test_only_changed_heads_is_an_error_that_says_how_to_upscale_them():
    base = Classifier()
    finetuned = noisy_copies(base, 2, only=r"classifier")
    with pytest.raises(ValueError, match=r"no linear layer outside the heads \['classifier'\] \(name them in "
                                         r"target_modules to upscale them\) differs .*; nothing to upscale"):
        upscale_model(copy.deepcopy(base), finetuned, gate_k=2, k=4, progress=False)
