"""FusionBench task pool: zero-shot label-prompt accuracy of a BERT-style sentence encoder."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseTaskPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin

from fusion_bench_pave.taskpool.report import accuracy_and_loss, evaluate_tasks
from fusion_bench_pave.taskpool.sentence_encoder import embed, label_prompt_head, prompt_logits
from fusion_bench_pave.taskpool.text_pool import check_every_task_has, load_tokenizer


@auto_register_config
class SentenceEncoderTaskPool(LightningFabricMixin, BaseTaskPool):
    """Evaluates an encoder (``model(input_ids, attention_mask)[0]`` = token states) on datasets of
    ``{"text", "label"}`` rows with frozen label-prompt heads from the pretrained ``encoder``.

    Models with ``set_task`` (FusionBench's task-modulated models, e.g. EMR-Merging) are switched
    to each task before it is evaluated.

    Args:
        test_datasets: task name -> dataset (or its config).
        encoder: path of the pretrained encoder whose prompt embeddings form the heads.
        label_prompts: task name -> ``{classnames: [...], templates: ["... {} ..."]}``.
        tokenizer: path or config of the tokenizer; None uses ``encoder``'s.
        logit_scale: multiplies the cosine similarities (the loss is reported at this scale).
        batch_size: evaluation batch size.
        max_length: inputs are truncated to this many tokens.
    """

    def __init__(
        self,
        test_datasets: DictConfig | dict[str, Any],
        encoder: str,
        label_prompts: DictConfig | dict[str, Any],
        tokenizer: str | DictConfig | None = None,
        logit_scale: float = 20.0,
        batch_size: int = 64,
        max_length: int = 128,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_every_task_has("label_prompts", label_prompts, test_datasets)
        self._heads: dict[str, Tensor] | None = None
        self._tokenizer = None

    def load_tokenizer(self):
        """The tokenizer, loaded once."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer or self.encoder)
        return self._tokenizer

    def heads(self, tokenizer) -> dict[str, Tensor]:
        """Class embeddings of every task from the pretrained encoder, computed once."""
        if self._heads is None:
            from transformers import AutoModel

            encoder = AutoModel.from_pretrained(self.encoder).eval()
            self._heads = {
                task: label_prompt_head(encoder, tokenizer, list(p["classnames"]), list(p["templates"]))
                for task, p in self.label_prompts.items()
            }
        return self._heads

    @torch.no_grad()
    def evaluate_task(self, model: nn.Module, tokenizer, head: Tensor, task: str, dataset) -> dict[str, float]:
        device = next(model.parameters()).device
        # batches of similar length pad less; accuracy and mean loss do not depend on the order
        lengths = [len(text) for text in dataset["text"]]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            for start in tqdm(range(0, len(dataset), self.batch_size), desc=f"Evaluating {task}", leave=False):
                rows = dataset[order[start : start + self.batch_size]]
                enc = tokenizer(rows["text"], return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length).to(device)
                logits = prompt_logits(embed(model, enc["input_ids"], enc["attention_mask"]).float(), head,
                                       self.logit_scale)
                yield logits, torch.tensor(rows["label"], device=device)

        return accuracy_and_loss(batches(), task)

    def evaluate(self, model: nn.Module, name: str | None = None, **kwargs) -> dict[str, Any]:
        tokenizer = self.load_tokenizer()
        heads = self.heads(tokenizer)
        model = self.fabric.to_device(model).eval()
        return evaluate_tasks(
            model, self.test_datasets,
            lambda m, task, data: self.evaluate_task(m, tokenizer, heads[task], task, data), name,
        )
