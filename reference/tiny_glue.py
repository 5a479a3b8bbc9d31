"""Offline replicas of the GLUE settings: RoBERTa-base (modelpool/taskpool=roberta-base_glue), a tiny
RobertaModel with a word-level tokenizer that frames inputs as RoBERTa's does, and GPT-2
(modelpool/taskpool=gpt-2_glue_heads), a tiny GPT2Model (Conv1D layers) whose tokenizer, like GPT-2's,
has only ``<|endoftext|>`` and adds no special tokens. Each has "fine-tuned" *ForSequenceClassification
copies (perturbed body, random head with the task's outputs) and small GLUE-shaped datasets with the
real column names, label types and split names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from reference.tiny_models import WORDS, encoder, gpt2, perturbed

WIDTH = 0.2  # initializer_range of the replica

#: task -> (text columns, outputs of the head (1: regression), evaluation split)
GLUE = {
    "cola": (("sentence",), 2, "validation"),
    "sst2": (("sentence",), 2, "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, "validation"),
    "qqp": (("question1", "question2"), 2, "validation"),
    "stsb": (("sentence1", "sentence2"), 1, "validation"),
    "mnli": (("premise", "hypothesis"), 3, "validation_matched"),
    "qnli": (("question", "sentence"), 2, "validation"),
    "rte": (("sentence1", "sentence2"), 2, "validation"),
}
#: FusionBench's GPT-2 GLUE checkpoints (tanganke/gpt2_<task>): every task but STS-B
GPT2_GLUE = {task: spec for task, spec in GLUE.items() if task != "stsb"}
GPT2_TOKEN = "<|endoftext|>"  # GPT-2's only special token: bos, eos, unk, and the pad of its GLUE classifiers


def roberta_tokenizer():
    """Word-level tokenizer with RoBERTa's special ids (<s> 0, <pad> 1, </s> 2, <unk> 3) and framing
    (``<s> A </s>``, ``<s> A </s></s> B </s>``), no token type ids, as roberta-base's."""
    from tokenizers.processors import TemplateProcessing

    from fusion_bench_pave.assets.tiny_models import word_tokenizer

    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer = word_tokenizer(WORDS, specials)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def gpt2_tokenizer():
    """Word-level tokenizer whose only special token is GPT-2's ``<|endoftext|>`` (id 0, no pad token,
    nothing added around a text or between a pair's two texts), as the gpt2 tokenizer's."""
    from fusion_bench_pave.assets.tiny_models import word_tokenizer

    tokenizer = word_tokenizer(WORDS, {"unk_token": GPT2_TOKEN})
    tokenizer.bos_token = tokenizer.eos_token = GPT2_TOKEN
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def glue_split(task: str, rows: int, seed: int) -> Dataset:
    columns, outputs, _ = GLUE[task]
    rng = np.random.default_rng(seed)
    data = {c: [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 10)))) for _ in range(rows)] for c in columns}
    data["label"] = (rng.uniform(0, 5, rows).round(2).tolist() if outputs == 1
                     else rng.integers(0, outputs, rows).tolist())
    data["idx"] = list(range(rows))
    return Dataset.from_dict(data)


def write_glue(out: Path, tasks: dict, train_rows: int, eval_rows: int) -> Path:
    """``out/glue/<task>/<split>`` (train and evaluation split) for every task of ``tasks``."""
    for i, (task, (_, _, split)) in enumerate(tasks.items()):
        glue_split(task, train_rows, 200 + i).save_to_disk(str(out / "glue" / task / "train"))
        glue_split(task, eval_rows, 300 + i).save_to_disk(str(out / "glue" / task / split))
    return out / "glue"


def build_roberta_glue(out: Path, train_rows: int = 24, eval_rows: int = 20) -> dict[str, Path]:
    """Write the replica under ``out``: ``pretrained/`` (RobertaModel + tokenizer), ``finetuned/<task>``
    (RobertaForSequenceClassification + tokenizer) and ``glue/<task>/<split>``; returns those three paths."""
    tokenizer = roberta_tokenizer()
    # weights drawn wider than the usual 0.02 std: the first token's state then varies from row to
    # row (std 0.35 instead of 0.004), so the replica's predictions and metrics are not constant
    pretrained = encoder("roberta", initializer_range=WIDTH)
    pretrained.save_pretrained(out / "pretrained")
    tokenizer.save_pretrained(out / "pretrained")
    body = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("pooler.")}
    for i, (task, (_, outputs, _)) in enumerate(GLUE.items()):
        classifier = encoder("roberta", seed=10 + i, num_labels=outputs, initializer_range=WIDTH)
        classifier.roberta.load_state_dict(body)
        perturbed(classifier, seed=100 + i).save_pretrained(out / "finetuned" / task)
        tokenizer.save_pretrained(out / "finetuned" / task)
    return {"pretrained": out / "pretrained", "finetuned": out / "finetuned",
            "glue": write_glue(out, GLUE, train_rows, eval_rows)}


def build_gpt2_glue(out: Path, train_rows: int = 24, eval_rows: int = 20) -> dict[str, Path]:
    """Write the GPT-2 replica under ``out``: ``pretrained/`` (GPT2Model + tokenizer), ``finetuned/<task>``
    (GPT2ForSequenceClassification with pad_token_id = ``<|endoftext|>``, as a GLUE classifier fine-tuned
    with FusionBench's GPT-2 tokenizer has) and ``glue/<task>/<split>``; returns those three paths."""
    tokenizer = gpt2_tokenizer()
    ids = {"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "initializer_range": WIDTH}
    pretrained = gpt2(classifier=True, num_labels=2, **ids).transformer
    pretrained.save_pretrained(out / "pretrained")
    tokenizer.save_pretrained(out / "pretrained")
    for i, (task, (_, outputs, _)) in enumerate(GPT2_GLUE.items()):
        classifier = gpt2(seed=10 + i, classifier=True, num_labels=outputs, **ids)
        classifier.transformer.load_state_dict(pretrained.state_dict())
        perturbed(classifier, seed=100 + i).save_pretrained(out / "finetuned" / task)
        tokenizer.save_pretrained(out / "finetuned" / task)
    return {"pretrained": out / "pretrained", "finetuned": out / "finetuned",
            "glue": write_glue(out, GPT2_GLUE, train_rows, eval_rows)}
