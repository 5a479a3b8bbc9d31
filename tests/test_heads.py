"""Task heads found from the model's structure (pave/heads.py), and PAVE leaving them unpurified."""

from __future__ import annotations

import copy

import pytest
import torch
from pave_helpers import CalibrationPool, text_dataset

import fusion_bench_pave.plugin  # noqa: F401  (compat repair before fusion_bench imports)
from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.heads import head_modules
from reference.tiny_models import T5, clip_vision, decoder, encoder, perturbed, t5, tokenizer

EXPECTED = {
    "bert classifier": (lambda: encoder("bert", num_labels=2), {"classifier"}),  # bert.pooler is the body's
    "roberta classifier": (lambda: encoder("roberta", num_labels=2), {"classifier.dense", "classifier.out_proj"}),
    "deberta-v2 classifier": (lambda: encoder("deberta-v2", num_labels=2), {"pooler.dense", "classifier"}),
    "roberta body": (lambda: encoder("roberta"), set()),
    "bert body with pooler": (lambda: encoder("bert"), set()),
    "t5 (output embeddings)": (lambda: t5(**T5), {"lm_head"}),
    "mistral causal LM": (lambda: decoder("mistral"), {"lm_head"}),
    "mistral body": (lambda: decoder("mistral", lm_head=False), set()),
    "clip vision": (clip_vision, set()),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_head_modules_per_architecture(case):
    build, expected = EXPECTED[case]
    assert head_modules(build()) == expected


def test_bert_masked_lm_head_and_tied_output_embeddings():
    from transformers import BertConfig, BertForMaskedLM

    from reference.tiny_models import BERT

    model = BertForMaskedLM(BertConfig(**BERT))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert head_modules(model) == {"cls.predictions.transform.dense", "cls.predictions.decoder"}


def test_pave_leaves_the_roberta_head_unpurified_by_default():
    base = encoder("roberta", num_labels=2, pad_token_id=0)
    models = {"_pretrained_": base, **{f"task{i}": perturbed(base, 100 + i) for i in range(2)}}

    def pool():
        train = {f"task{i}": text_dataset(16, 200 + i) for i in range(2)}
        return CalibrationPool(copy.deepcopy(models), train, tokenizer(), "text")

    algo = PAVE(merger={"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3},
                rho=0.75, num_samples=12, batch_size=4, eps0=0.01)
    merged = algo.run(pool())["model"].state_dict()
    purified = set(algo.extras["full_ranks"])
    assert {"classifier.dense", "classifier.out_proj"}.isdisjoint(purified)
    assert "roberta.encoder.layer.0.attention.self.query" in purified and len(purified) == 2 * 6
    oracle = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool()).state_dict()
    for key in ("classifier.dense.weight", "classifier.out_proj.weight"):  # the head: plain Task Arithmetic
        assert torch.equal(merged[key], oracle[key]), key
    assert not torch.equal(merged["roberta.encoder.layer.0.attention.self.query.weight"],
                           oracle["roberta.encoder.layer.0.attention.self.query.weight"])
