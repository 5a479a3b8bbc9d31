"""An offline replica of the RoBERTa-base GLUE setting (modelpool/taskpool=roberta-base_glue): a tiny
RobertaModel with a word-level tokenizer that frames inputs as RoBERTa's does, eight "fine-tuned"
RobertaForSequenceClassification copies (perturbed body, random head with the task's outputs) and
small GLUE-shaped datasets with the real column names, label types and split names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from reference.tiny_models import WORDS, encoder, perturbed

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


def glue_split(task: str, rows: int, seed: int) -> Dataset:
    columns, outputs, _ = GLUE[task]
    rng = np.random.default_rng(seed)
    data = {c: [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 10)))) for _ in range(rows)] for c in columns}
    data["label"] = (rng.uniform(0, 5, rows).round(2).tolist() if outputs == 1
                     else rng.integers(0, outputs, rows).tolist())
    data["idx"] = list(range(rows))
    return Dataset.from_dict(data)


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
    for i, (task, (_, outputs, split)) in enumerate(GLUE.items()):
        classifier = encoder("roberta", seed=10 + i, num_labels=outputs, initializer_range=WIDTH)
        classifier.roberta.load_state_dict(body)
        perturbed(classifier, seed=100 + i).save_pretrained(out / "finetuned" / task)
        tokenizer.save_pretrained(out / "finetuned" / task)
        glue_split(task, train_rows, 200 + i).save_to_disk(str(out / "glue" / task / "train"))
        glue_split(task, eval_rows, 300 + i).save_to_disk(str(out / "glue" / task / split))
    return {"pretrained": out / "pretrained", "finetuned": out / "finetuned", "glue": out / "glue"}
