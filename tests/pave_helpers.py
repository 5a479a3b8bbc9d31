"""Tiny in-process model pools for the PAVE tests: CLIP vision, T5, Mistral and GPT-2 (reference.tiny_models)
with a word-level tokenizer, perturbed fine-tuned copies and small train splits. Nothing is downloaded."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from torch import nn

from fusion_bench import BaseModelPool
from reference.tiny_models import WORDS, clip_vision, decoder, gpt2, perturbed, t5, tokenizer

# the PAVE tests' T5 and Mistral: reference.tiny_models' defaults with these fields
T5 = dict(vocab_size=64, d_kv=16, num_heads=2, feed_forward_proj="relu", eos_token_id=1)
MISTRAL = dict(max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1, sliding_window=None)


class CalibrationPool(BaseModelPool):
    """A BaseModelPool of in-memory models with in-memory train splits and a preprocessor."""

    def __init__(self, models: dict[str, nn.Module], train: dict[str, Dataset], preprocessor: Any, kind: str):
        super().__init__(models, train_datasets=train)
        self.kind = kind
        self._preprocessor_object = preprocessor
        if kind == "image":
            self._processor = preprocessor
        else:
            self._tokenizer = None

    def load_train_dataset(self, dataset_name: str, *args, **kwargs) -> Dataset:
        return self._train_datasets[dataset_name]

    def load_val_dataset(self, dataset_name: str, *args, **kwargs) -> Dataset:
        return self._val_datasets[dataset_name]

    def load_test_dataset(self, dataset_name: str, *args, **kwargs) -> Dataset:
        return self._test_datasets[dataset_name]

    def load_processor(self, *args, **kwargs):
        return self._preprocessor_object

    def load_tokenizer(self, *args, **kwargs):
        return self._preprocessor_object


def image_dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]})


def text_dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]
    return Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(n)]})


def make_pool(kind: str = "clip", tasks: int = 3, rows: int = 24, dtype: torch.dtype = torch.float32) -> CalibrationPool:
    """Pretrained + `tasks` perturbed fine-tuned copies of a tiny model, with train splits. `kind`:
    clip, t5, mistral, gpt2 (LM head) or gpt2_classifier."""
    if kind == "clip":
        from transformers import CLIPImageProcessor

        base = clip_vision()
        pre = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        data = lambda s: image_dataset(rows, s)  # noqa: E731
        data_kind = "image"
    else:
        builders = {"t5": lambda: t5(**T5), "gpt2": gpt2, "gpt2_classifier": lambda: gpt2(classifier=True),
                    "mistral": lambda: decoder("mistral", **MISTRAL)}
        base = builders[kind]().to(dtype)
        pre = tokenizer()
        data = lambda s: text_dataset(rows, s)  # noqa: E731
        data_kind = "text"
    names = [f"task{i}" for i in range(tasks)]
    models = {"_pretrained_": base, **{n: perturbed(base, 100 + i) for i, n in enumerate(names)}}
    train = {n: data(200 + i) for i, n in enumerate(names)}
    return CalibrationPool(models, train, pre, data_kind)


class OwnTaskArithmetic:
    """A user's own task-vector merger (no FusionBench base class), declared as such."""

    merges_task_vectors = True

    def __init__(self, scaling_factor: float):
        self.scaling_factor = scaling_factor

    def run(self, modelpool):
        from fusion_bench.method import TaskArithmeticAlgorithm

        return TaskArithmeticAlgorithm(scaling_factor=self.scaling_factor).run(modelpool)


class UndeclaredMerger(OwnTaskArithmetic):
    merges_task_vectors = False


class PoolRecordingMerger(OwnTaskArithmetic):
    """OwnTaskArithmetic that records what the pool it was handed offers besides the models."""

    seen: dict = {}

    def run(self, modelpool):
        PoolRecordingMerger.seen = {
            "type": type(modelpool),
            "train": {task: modelpool.load_train_dataset(task)["text" if modelpool.kind == "text" else "image"][:2]
                      for task in modelpool.model_names},
            "preprocessor": modelpool.load_processor(),
            "models": {name: modelpool.load_model(name) for name in modelpool.all_model_names},
            "instances": dict(modelpool._models),
        }
        return super().run(modelpool)
