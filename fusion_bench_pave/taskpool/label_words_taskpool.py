"""FusionBench task pool: accuracy of a seq2seq or causal LM on label-word classification tasks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseTaskPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin

from fusion_bench_pave.taskpool.label_words import label_logits, label_token_ids
from fusion_bench_pave.taskpool.report import accuracy_and_loss, evaluate_tasks
from fusion_bench_pave.taskpool.text_pool import check_every_task_has, load_tokenizer


@auto_register_config
class LabelWordsTaskPool(LightningFabricMixin, BaseTaskPool):
    """Evaluates a language model on datasets of ``{"text", "label"}`` rows.

    Args:
        test_datasets: task name -> dataset (or its config).
        tokenizer: path of the tokenizer, or its config.
        label_words: task name -> one single-token word per class, in label order.
        prompt_template: format string applied to each row's ``text``.
        batch_size: evaluation batch size.
        max_length: inputs are truncated to this many tokens.
    """

    def __init__(
        self,
        test_datasets: DictConfig | dict[str, Any],
        tokenizer: str | DictConfig,
        label_words: DictConfig | dict[str, list[str]],
        prompt_template: str = "{text}",
        batch_size: int = 32,
        max_length: int = 128,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_every_task_has("label_words", label_words, test_datasets)

    @torch.no_grad()
    def evaluate_task(self, model: nn.Module, tokenizer, task: str, dataset) -> dict[str, float]:
        label_ids = label_token_ids(tokenizer, list(self.label_words[task]))
        device = next(model.parameters()).device

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            for start in tqdm(range(0, len(dataset), self.batch_size), desc=f"Evaluating {task}", leave=False):
                rows = dataset[start : start + self.batch_size]
                enc = tokenizer(
                    [self.prompt_template.format(text=t) for t in rows["text"]],
                    return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                ).to(device)
                logits = label_logits(model, enc["input_ids"], enc["attention_mask"], label_ids)
                yield logits, torch.tensor(rows["label"], device=device)

        return accuracy_and_loss(batches(), task)

    def evaluate(self, model: nn.Module, name: str | None = None, **kwargs) -> dict[str, Any]:
        tokenizer = load_tokenizer(self.tokenizer)
        model = self.fabric.to_device(model).eval()
        return evaluate_tasks(
            model, self.test_datasets, lambda m, task, data: self.evaluate_task(m, tokenizer, task, data), name
        )
