"""Tiny in-process model pools for the PAVE tests: CLIP vision, T5 and Mistral with a word-level
tokenizer, perturbed fine-tuned copies and small train splits. Nothing is downloaded."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from torch import nn

from fusion_bench import BaseModelPool

WORDS = [f"w{i}" for i in range(40)]


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

    def load_processor(self, *args, **kwargs):
        return self._preprocessor_object

    def load_tokenizer(self, *args, **kwargs):
        return self._preprocessor_object


def perturbed(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """A 'fine-tuned' copy: every float parameter plus seeded low-rank-ish noise."""
    import copy

    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            noise = torch.randn(p.shape, generator=generator) * scale * (p.std() if p.numel() > 1 else 1)
            p.add_(noise.to(p.dtype))
    return clone


def image_dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]})


def text_dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]
    return Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(n)]})


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_clip(seed: int = 0) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )
    return CLIPVisionModel(config).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_mistral(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, sliding_window=None,
    )
    return MistralForCausalLM(config).to(dtype).eval()


def make_pool(kind: str = "clip", tasks: int = 3, rows: int = 24, dtype: torch.dtype = torch.float32) -> CalibrationPool:
    """Pretrained + `tasks` perturbed fine-tuned copies of a tiny model, with train splits."""
    if kind == "clip":
        from transformers import CLIPImageProcessor

        base = tiny_clip()
        pre = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        data = lambda s: image_dataset(rows, s)  # noqa: E731
        data_kind = "image"
    else:
        base = tiny_t5() if kind == "t5" else tiny_mistral(dtype=dtype)
        pre = word_tokenizer()
        data = lambda s: text_dataset(rows, s)  # noqa: E731
        data_kind = "text"
    names = [f"task{i}" for i in range(tasks)]
    models = {"_pretrained_": base, **{n: perturbed(base, 100 + i) for i, n in enumerate(names)}}
    train = {n: data(200 + i) for i, n in enumerate(names)}
    return CalibrationPool(models, train, pre, data_kind)
