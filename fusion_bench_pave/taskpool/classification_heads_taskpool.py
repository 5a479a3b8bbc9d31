"""FusionBench task pool: a merged encoder body evaluated with each task's own classification head
(the GLUE protocol of model-merging papers: the body is merged, the heads are not)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseTaskPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin
from fusion_bench.utils import instantiate

from fusion_bench_pave.taskpool.metrics import METRICS
from fusion_bench_pave.taskpool.report import evaluate_tasks
from fusion_bench_pave.taskpool.text_pool import check_every_task_has, load_tokenizer
from fusion_bench_pave.text_columns import TEXT_COLUMNS, TEXT_PAIRS, text_columns


def load_classifier(source: str | DictConfig | dict) -> nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained`` for a path, ``instantiate`` for a config."""
    if isinstance(source, str):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(source)
    return instantiate(source)


def attach_body(classifier: nn.Module, body: nn.Module, task: str) -> nn.Module:
    """``classifier`` with the weights of its body (``base_model``) replaced by ``body``'s; the two
    must have the same parameter names and shapes."""
    target = classifier.base_model if hasattr(classifier, "base_model") else classifier
    if target is classifier:
        raise ValueError(f"task '{task}': the classifier {type(classifier).__name__} has no separate body "
                         "(base_model) to replace with the merged model.")
    state = body.state_dict()
    mismatched = sorted(set(target.state_dict()) ^ set(state))
    if mismatched:
        raise ValueError(
            f"task '{task}': the merged {type(body).__name__} and the body of its classifier "
            f"{type(classifier).__name__} differ in parameters {mismatched[:6]}; the model pool must hold the "
            "bodies of these classifiers (e.g. AutoModel with add_pooling_layer=false for RoBERTa)."
        )
    target.load_state_dict(state)
    return classifier


@auto_register_config
class ClassificationHeadsTaskPool(LightningFabricMixin, BaseTaskPool):
    """Evaluates a merged encoder body (a ``*Model`` such as ``RobertaModel``) on text-classification
    datasets, each task with the head of its own fine-tuned ``*ForSequenceClassification`` model: the
    body's weights are copied into that model, which then scores the task's test split.

    Rows are ``{<text column or GLUE sentence pair>, "label"}`` (fusion_bench_pave.text_columns); a
    head with one output is a regression head (STS-B), its output the prediction. Each task reports
    its metrics and ``score``, their mean; ``average.score`` is the mean over tasks. Models with
    ``set_task`` (task-modulated models, e.g. EMR-Merging) are switched to each task first.

    Args:
        test_datasets: task name -> dataset (or its config).
        classifiers: task name -> path or config of the task's fine-tuned sequence classifier.
        tokenizer: path of the tokenizer, or its config.
        metrics: task name -> metric names (accuracy, matthews_correlation, pearson, spearman); a task
            not listed gets pearson and spearman for a regression head, else accuracy.
        batch_size: evaluation batch size.
        max_length: inputs are truncated to this many tokens.
    """

    def __init__(
        self,
        test_datasets: DictConfig | dict[str, Any],
        classifiers: DictConfig | dict[str, Any],
        tokenizer: str | DictConfig,
        metrics: DictConfig | dict[str, list[str]] | None = None,
        batch_size: int = 32,
        max_length: int = 128,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_every_task_has("classifiers", classifiers, test_datasets)
        for task, names in (metrics or {}).items():
            unknown = sorted(set(names) - set(METRICS))
            if unknown:
                raise ValueError(f"task '{task}': unknown metrics {unknown}; choose from {sorted(METRICS)}.")

    def task_metrics(self, task: str, regression: bool) -> list[str]:
        if self.metrics and task in self.metrics:
            return list(self.metrics[task])
        return ["pearson", "spearman"] if regression else ["accuracy"]

    @torch.no_grad()
    def predict(self, classifier: nn.Module, tokenizer, columns: tuple[str, ...], dataset, task: str) -> Tensor:
        """The classifier's logits on every row of ``dataset``, in order."""
        device = next(classifier.parameters()).device
        logits = []
        for start in tqdm(range(0, len(dataset), self.batch_size), desc=f"Evaluating {task}", leave=False):
            rows = dataset[start : start + self.batch_size]
            encoded = tokenizer(*(rows[c] for c in columns), return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length).to(device)
            logits.append(classifier(**encoded).logits.float().cpu())
        return torch.cat(logits)

    def evaluate_task(self, body: nn.Module, tokenizer, task: str, dataset) -> dict[str, float]:
        columns = text_columns(dataset.column_names)
        if columns is None or "label" not in dataset.column_names:
            raise ValueError(f"task '{task}': test dataset has columns {dataset.column_names}; it needs 'label' "
                             f"and a text column {TEXT_COLUMNS} or a sentence pair {TEXT_PAIRS}.")
        labels = torch.tensor(list(dataset["label"]), dtype=torch.float64)  # STS-B's scores kept exact
        classifier = attach_body(load_classifier(self.classifiers[task]), body, task)
        regression = classifier.config.num_labels == 1
        if not regression and bool((labels < 0).any()):
            raise ValueError(f"task '{task}': the test dataset has rows without a label (-1), as GLUE's test "
                             "splits do; evaluate on the validation split.")
        logits = self.predict(self.fabric.to_device(classifier).eval(), tokenizer, columns, dataset, task)
        predictions, labels = (logits[:, 0], labels) if regression else (logits.argmax(-1), labels.long())
        scores = {name: METRICS[name](predictions, labels) for name in self.task_metrics(task, regression)}
        scores["score"] = sum(scores.values()) / len(scores)
        return scores

    def evaluate(self, model: nn.Module, name: str | None = None, **kwargs) -> dict[str, Any]:
        tokenizer = load_tokenizer(self.tokenizer)
        model = self.fabric.to_device(model).eval()
        return evaluate_tasks(
            model, self.test_datasets, lambda body, task, data: self.evaluate_task(body, tokenizer, task, data), name
        )
