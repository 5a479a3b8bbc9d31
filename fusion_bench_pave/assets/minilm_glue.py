"""The GLUE-protocol MiniLM zoo: all-MiniLM-L6-v2 fully fine-tuned, with a fresh classification head per
task, on the six real text tasks of the MiniLM zoo; one zoo per fine-tuning seed.

Layout (``<cache>/zoo/minilm_glue_s<seed>-v<RECIPE>/``)::

    pretrained/               BertModel (pooler included) + tokenizer
    models/<task>/            the fine-tuned BertForSequenceClassification (body + the task's head)
    data/<task>/{train,val,test}/   the MiniLM zoo's rows (same sampling, n_train rows for training)
    build.json                recipe, seed and build time
    COMPLETE

Fine-tuning follows the GLUE protocol of the merging papers (RoBERTa/GLUE in TIES, EMR, PAVE): every
parameter and a randomly initialised head (BERT's pooler -> dropout -> linear) are trained for a few
epochs with AdamW and a linear warmup/decay schedule; the bodies are merged, each task keeps its own
head (modelpool=zoo_minilm_glue_s<seed>, taskpool=zoo_minilm_glue). The data splits are the same for
every seed; the seed sets the head initialisation, dropout and batch order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fusion_bench_pave.assets.finetune import train_epochs, unpadded_rows
from fusion_bench_pave.assets.minilm import N_TEST, N_VAL, pretrained_path, save_rows
from fusion_bench_pave.assets.text_tasks import TEXT_TASKS, classnames, load_text_task

RECIPE = 1
N_TRAIN = 400
EPOCHS, BATCH_SIZE, LR, MAX_LENGTH = 3, 16, 5e-5, 64
DATA_SEED = 0


def finetune_classifier(model, tokenizer, rows: list[dict], seed: int, epochs: int = EPOCHS, lr: float = LR,
                        batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH, desc: str | None = None):
    """Fine-tune a ``*ForSequenceClassification`` model (body and head) in place on ``rows`` (GLUE-style,
    ``finetune.train_epochs``); inputs truncated to ``max_length`` tokens."""
    enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])

    def loss(idx: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = unpadded_rows(enc, idx)
        return F.cross_entropy(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels[idx])

    return train_epochs(model, loss, len(rows), epochs, batch_size, lr, seed, desc=desc)


def build(out: Path, seed: int, tasks: list[str] | None = None, source: str | None = None,
          n_train: int = N_TRAIN, n_val: int = N_VAL, n_test: int = N_TEST, epochs: int = EPOCHS) -> None:
    """Write the zoo of fine-tuning seed ``seed`` into ``out``. ``source``: the pretrained BertModel
    directory (default: the installed all-MiniLM-L6-v2); ``tasks``: default all six text tasks."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    start, cpu_start = time.perf_counter(), time.process_time()
    source = source or pretrained_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    AutoModel.from_pretrained(source).save_pretrained(out / "pretrained")
    tokenizer.save_pretrained(out / "pretrained")
    tasks = list(TEXT_TASKS) if tasks is None else list(tasks)
    for i, task in enumerate(tqdm(tasks, desc=f"MiniLM GLUE zoo, seed {seed}")):
        splits = load_text_task(task, n_train, n_val, n_test, seed=DATA_SEED)
        for split, rows in splits.items():
            save_rows(rows, out / "data" / task / split)
        torch.manual_seed(1000 * seed + i)  # head initialisation and dropout
        model = AutoModelForSequenceClassification.from_pretrained(out / "pretrained", num_labels=len(classnames(task)))
        finetune_classifier(model, tokenizer, splits["train"], seed=1000 * seed + i, epochs=epochs, desc=task)
        model.save_pretrained(out / "models" / task)
    info = {"recipe": RECIPE, "seed": seed, "tasks": tasks, "n_train": n_train, "n_val": n_val, "n_test": n_test,
            "epochs": epochs, "batch_size": BATCH_SIZE, "lr": LR, "max_length": MAX_LENGTH,
            "build_seconds": round(time.perf_counter() - start, 1),
            "build_cpu_seconds": round(time.process_time() - cpu_start, 1), "threads": torch.get_num_threads()}
    (out / "build.json").write_text(json.dumps(info, indent=2))
