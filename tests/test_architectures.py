"""PAVE and SMILE on tiny locally built models of the families FusionBench users merge: CLIP vision,
T5, BERT, RoBERTa, DeBERTa-v2, GPT-2 (Conv1D), Llama, Mistral, Qwen2 (nothing downloaded).

PAVE: rho = 1 is FusionBench's Task Arithmetic bit for bit; rho < 1 purifies every linear layer of
the body (each task keeps a non-zero rank of each, and less than all in total) and nothing in the
heads. SMILE in memory: every changed body layer is upscaled, the heads are left pretrained, and a
single dense top-1 expert reproduces the fine-tuned model.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from pave_helpers import MISTRAL, T5, CalibrationPool, image_dataset, text_dataset
from torch import nn

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench_pave.linear_layers import is_exactly_linear, is_linear
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.heads import head_modules
from fusion_bench_pave.smile import SmileLinear, upscale_model
from reference.tiny_models import BERT, DECODER, clip_vision, decoder, gpt2, perturbed, t5, tokenizer

TASKS = ["task0", "task1"]
TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
TOKEN = dict(pad_token_id=0, num_labels=3)


def _hf(config_name: str, model_name: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()

    return build


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "clip_vision": clip_vision,
    "t5": lambda: t5(**T5),
    "bert": _hf("BertConfig", "BertForSequenceClassification", **BERT, **TOKEN),
    "roberta": _hf("RobertaConfig", "RobertaForSequenceClassification", **{**BERT, "max_position_embeddings": 72}, **TOKEN),
    "deberta_v2": _hf("DebertaV2Config", "DebertaV2ForSequenceClassification", **BERT, **TOKEN, relative_attention=True,
                      pos_att_type=["c2p", "p2c"], position_buckets=8, max_relative_positions=16, pooler_hidden_size=32),
    "gpt2": lambda: gpt2(classifier=True),
    "llama": _hf("LlamaConfig", "LlamaForCausalLM", **DECODER, **MISTRAL),
    "mistral": lambda: decoder("mistral", **MISTRAL),
    "qwen2": lambda: decoder("qwen2", **{**MISTRAL, "tie_word_embeddings": True}),
}


_models: dict[str, nn.Module] = {}


def pretrained(family: str) -> nn.Module:
    """The family's model, built once per session; callers get deep copies."""
    if family not in _models:
        _models[family] = BUILDERS[family]()
    return copy.deepcopy(_models[family])


def pool(family: str) -> CalibrationPool:
    """Pretrained + two perturbed fine-tuned copies with small train splits."""
    base = pretrained(family)
    models = {"_pretrained_": base, **{t: perturbed(base, 100 + i) for i, t in enumerate(TASKS)}}
    if family == "clip_vision":
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return CalibrationPool(models, {t: image_dataset(12, 200 + i) for i, t in enumerate(TASKS)}, processor, "image")
    return CalibrationPool(models, {t: text_dataset(12, 200 + i) for i, t in enumerate(TASKS)}, tokenizer(), "text")


def inputs(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if family == "clip_vision":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    ids = torch.randint(3, 40, (2, 7), generator=g)
    extra = {"decoder_input_ids": torch.randint(3, 40, (2, 5), generator=g)} if family == "t5" else {}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


def body_layers(model: nn.Module, linear: Callable[[nn.Module], bool] = is_linear) -> list[str]:
    """The linear layers outside the task heads, in module order."""
    heads = head_modules(model)
    return [name for name, module in model.named_modules() if linear(module) and name not in heads]


def pave(**kwargs) -> PAVE:
    return PAVE(merger=TA, **{"num_samples": 8, "batch_size": 4, "eps0": 0.01, **kwargs})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_pave_rho_one_is_task_arithmetic_bit_for_bit(family):
    merged = pave(rho=1.0, report_extras=False).run(pool(family))
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool(family))
    expected = oracle.state_dict()
    for key, value in merged.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("family", list(BUILDERS))
def test_pave_purifies_every_body_layer_and_no_head(family):
    algo = pave(rho=0.5)
    algo.run(pool(family))
    extras = algo.extras
    assert sorted(extras["full_ranks"]) == sorted(body_layers(pretrained(family)))
    for task in TASKS:
        assert all(rank > 0 for rank in extras["ranks"][task].values()), task
        assert 0 < extras["kept_ratio"][task] < 1, task


@pytest.mark.parametrize("family", list(BUILDERS))
def test_smile_upscales_every_changed_body_layer_and_leaves_heads(family):
    base = pretrained(family)
    model, report = upscale_model(copy.deepcopy(base), [perturbed(base, 100 + i) for i in range(3)], gate_k=2, k=4,
                                  top_k=2, progress=False)
    body = body_layers(base, is_exactly_linear)
    assert report.upscaled == body
    heads = head_modules(base)  # a set: the report lists them in module order
    assert report.heads == [name for name, _ in base.named_modules() if name in heads and name not in body]
    assert report.ranks == {name: (2, 4) for name in body}  # every layer here is at least 4 wide
    assert {name for name, m in model.named_modules() if isinstance(m, SmileLinear)} == set(body)
    for head in report.heads:
        assert type(model.get_submodule(head)) is type(base.get_submodule(head))
        assert head in report.kept_pretrained  # perturbed, so reported (and logged) as kept pretrained


@torch.no_grad()
def body_only_finetuned(model: nn.Module, seed: int) -> nn.Module:
    """A copy in which only the body's linear layers (weights and biases) moved."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for name in body_layers(clone, is_exactly_linear):
        for p in clone.get_submodule(name).parameters(recurse=False):
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return clone


@pytest.mark.parametrize("family", list(BUILDERS))
@torch.no_grad()
def test_smile_one_dense_expert_reproduces_the_finetuned_model(family):
    base = pretrained(family)
    finetuned = body_only_finetuned(base, 7)
    model, report = upscale_model(copy.deepcopy(base), [finetuned], gate_k=1, k=0, top_k=1, progress=False)
    assert report.upscaled and not report.kept_pretrained
    x = inputs(family)
    # W0 x + (W_ft - W0) x against W_ft x in float32: rounding of sums over widths <= 64, ~1e-6
    torch.testing.assert_close(model(**x)[0], finetuned(**x)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base(**x)[0], finetuned(**x)[0], atol=1e-3)  # the experts matter


def test_heads_of_the_families():
    """Heads found from the model structure: RoBERTa's two-layer classifier, DeBERTa's pooler, GPT-2's score."""
    heads = {family: sorted(head_modules(pretrained(family))) for family in ("roberta", "deberta_v2", "gpt2", "clip_vision")}
    assert heads["roberta"] == ["classifier.dense", "classifier.out_proj"]
    assert heads["deberta_v2"] == ["classifier", "pooler.dense"]
    assert heads["gpt2"] == ["score"]
    assert heads["clip_vision"] == []
