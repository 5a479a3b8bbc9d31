"""Turn a task's calibration split (train by default) into model inputs for covariance collection.

Image datasets (column `image`) go through the pool's CLIP processor (an open_clip pool's per-image
transform: `ImageTransform`, and the model takes the pixels positionally); text datasets (one text column,
or a GLUE sentence pair: fusion_bench_pave.text_columns) through its tokenizer, with the attention mask
as the token mask. Encoder-decoder models also get decoder inputs (the input text shifted right),
masked with the same attention mask, which covers only real tokens of the shifted sequence.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import datasets
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from transformers import AutoTokenizer

from fusion_bench_pave.io.fingerprint import cache_key
from fusion_bench_pave.text_columns import TEXT_COLUMNS, TEXT_PAIRS, text_columns

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img")


class ImageTransform:
    """A per-image transform (open_clip's preprocess, a torchvision Compose) used as a batch image
    processor; models fed by it (open_clip encoders) take the pixels as their first argument."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, images: Sequence[Any], return_tensors: str = "pt") -> dict[str, Tensor]:
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}

    def to_dict(self) -> dict[str, str]:
        """The transform's description for the cache key (without the addresses of plain functions)."""
        return {"transform": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(self.transform))}


#: sample_order -> how calibration picks its rows: a seeded random subset, or the first rows in
#: dataset order (the official ViT path reads its unshuffled test loader).
SAMPLE_ORDERS = ("random", "first")


def sample_indices(num_rows: int, num_samples: int, seed: int, task: str, order: str = "random") -> list[int]:
    """`num_samples` row indices of a split of `num_rows` rows: a seeded random subset ("random") or
    rows 0 .. num_samples - 1 in dataset order ("first"); errors if the split is too small."""
    if order not in SAMPLE_ORDERS:
        raise ValueError(f"sample_order must be one of {list(SAMPLE_ORDERS)}, got {order!r}.")
    if num_rows == 0:
        raise ValueError(f"task '{task}': its calibration dataset is empty (0 rows); PAVE needs calibration samples.")
    if num_samples > num_rows:
        raise ValueError(
            f"task '{task}': asked for {num_samples} calibration samples but its calibration dataset has only "
            f"{num_rows} rows; lower num_samples to at most {num_rows}."
        )
    if order == "first":
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows, generator=generator)[:num_samples].tolist()


def shard(indices: Sequence[int], rank: int, world_size: int, batch_size: int) -> list[int]:
    """The rows one process handles: whole batches dealt round robin, so every batch (and its
    padding) is the same as in a single-process run and the all-reduced sums match it."""
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return [i for batch in batches[rank::world_size] for i in batch]


def find_column(dataset: Any, task: str) -> tuple[str, tuple[str, ...]]:
    """('image', (column,)) or ('text', (column,) or a sentence pair) of the model input."""
    if not hasattr(dataset, "column_names"):
        raise ValueError(
            f"task '{task}': calibration data must be a Hugging Face datasets.Dataset with an image "
            f"or text column, got {type(dataset).__name__}."
        )
    columns = list(dataset.column_names)
    image = next((name for name in IMAGE_COLUMNS if name in columns), None)
    if image is not None:
        return "image", (image,)
    text = text_columns(columns)
    if text is not None:
        return "text", text
    raise ValueError(
        f"task '{task}': calibration dataset has columns {columns}, none of which is an image "
        f"{IMAGE_COLUMNS} or text {TEXT_COLUMNS} column or a sentence pair {TEXT_PAIRS}."
    )


def dataset_fingerprint(dataset: Any, task: str) -> str:
    """Identity of a calibration dataset for the cache: HF fingerprint if it has one, and the input
    columns read from it (a sentence pair is read as a pair)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    columns = ",".join(find_column(dataset, task)[1])
    return f"{task}:{fingerprint or 'nofp'}:{len(dataset)}:{columns}"


#: Tokenizer settings outside the serialised tokenizer that change the batches PAVE builds.
TOKENIZER_SETTINGS = ("padding_side", "truncation_side", "model_max_length", "pad_token", "special_tokens_map",
                      "add_bos_token", "add_eos_token")


def preprocessor_fingerprint(preprocessor: Any) -> Optional[str]:
    """Content hash of what turns calibration samples into model inputs, for the cache key: a fast
    tokenizer's serialised pipeline (vocabulary, normaliser, pre-tokeniser, post-processor) or a slow
    one's vocabulary, plus the settings in TOKENIZER_SETTINGS; an image processor's (or processor's)
    configuration. Never a path. None if the object offers neither (it cannot be fingerprinted)."""
    content: dict[str, Any] = {"class": type(preprocessor).__qualname__}
    if hasattr(preprocessor, "backend_tokenizer") or callable(getattr(preprocessor, "get_vocab", None)):
        if hasattr(preprocessor, "backend_tokenizer"):
            pipeline = json.loads(preprocessor.backend_tokenizer.to_str())
            for per_call in ("truncation", "padding"):  # set by each call (PAVE passes its own)
                pipeline.pop(per_call, None)
            content["pipeline"] = pipeline
        else:
            content["vocab"] = sorted(preprocessor.get_vocab().items())
        content.update({key: getattr(preprocessor, key, None) for key in TOKENIZER_SETTINGS})
    elif callable(getattr(preprocessor, "to_dict", None)):
        content["config"] = preprocessor.to_dict()
        # the backend (PIL or torchvision) of the same configuration resizes differently
        content["image_processor"] = type(getattr(preprocessor, "image_processor", None)).__qualname__
    else:
        return None
    return cache_key(content)


def encoder_decoder_inputs(model: nn.Module, input_ids: Tensor) -> Optional[Tensor]:
    """Decoder input ids (input shifted right) for encoder-decoder models, else None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    return model.prepare_decoder_input_ids_from_labels(labels=input_ids)


def iter_batches(
    dataset: Any,
    indices: Sequence[int],
    preprocessor: Any,
    model: nn.Module,
    task: str,
    batch_size: int = 16,
    max_length: int = 128,
    mask_padding: bool = True,
    padding: str = "longest",
) -> Iterator[tuple[dict[str, Tensor], Optional[Tensor]]]:
    """Yield (model kwargs, token mask) batches for the selected rows. Texts are padded to the
    batch's longest ("longest", the dynamic padding of the official GLUE path) or each to
    `max_length` ("max_length", the official LLM path); with mask_padding=False the padding tokens
    are rows of the covariance, as in the official code. Inputs go to the model's device and dtype
    (the CPU for a model on the meta device: a streamed checkpoint's skeleton)."""
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}.")
    kind, columns = find_column(dataset, task)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    if device.type == "meta":
        device = torch.device("cpu")
    for start in range(0, len(indices), batch_size):
        rows = dataset.select(indices[start : start + batch_size])
        if kind == "image":
            images = [image.convert("RGB") for image in rows[columns[0]]]
            pixels = preprocessor(images=images, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
            yield ((pixels,) if isinstance(preprocessor, ImageTransform) else {"pixel_values": pixels}), None
            continue
        encoded = preprocessor(
            *(list(rows[c]) for c in columns), padding=padding, truncation=True, max_length=max_length,
            return_tensors="pt",
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in encoded and len(columns) == 2:  # BERT's segment ids of a pair
            inputs["token_type_ids"] = encoded["token_type_ids"]
        decoder_ids = encoder_decoder_inputs(model, input_ids)
        if decoder_ids is not None:
            inputs["decoder_input_ids"] = decoder_ids
            inputs["decoder_attention_mask"] = attention_mask
        inputs = {k: v.to(device) for k, v in inputs.items()}
        yield inputs, attention_mask.to(device) if mask_padding else None


#: calibration_split -> (modelpool key, its loader method). "test" is test leakage: only when asked for.
SPLITS = {
    "train": ("train_datasets", "load_train_dataset"),
    "validation": ("val_datasets", "load_val_dataset"),
    "test": ("test_datasets", "load_test_dataset"),
}


def load_calibration_dataset(
    modelpool: Any, task: str, configured: Optional[Mapping] = None, split: str = "train"
) -> Any:
    """The calibration dataset of `task`: `configured[task]` if given (a saved dataset path, a hub
    name loaded at `split`, or an instantiable config), else the pool's `split` datasets (train by
    default; validation; test, which leaks the evaluation data and is logged as a warning: the
    official ViT code calibrates on the test loader)."""
    if split not in SPLITS:
        raise ValueError(f"calibration_split must be one of {list(SPLITS)}, got {split!r}.")
    if configured and task in configured:
        source = configured[task]
        if isinstance(source, str) and not os.path.exists(os.path.join(source, "state.json")):
            warn_test_leakage(task, split, f"split '{split}' of {source}")
            return datasets.load_dataset(source, split=split)
        if split != "train":
            log.warning(
                "task '%s': calibration_split=%r does not apply to its configured calibration dataset "
                "(method.calibration_datasets.%s), which is used as given.", task, split, task,
            )
        return datasets.load_from_disk(source) if isinstance(source, str) else instantiate(source)
    require_calibration_data(modelpool, task, configured, split)
    key, loader = SPLITS[split]
    warn_test_leakage(task, split, f"the modelpool's {key}.{task}")
    return getattr(modelpool, loader)(task)


def require_calibration_data(modelpool: Any, task: str, configured: Optional[Mapping] = None, split: str = "train") -> None:
    """ValueError unless `task` has calibration data: configured, or in the pool's `split` datasets
    (checked for every task before any statistics are collected)."""
    if split not in SPLITS:
        raise ValueError(f"calibration_split must be one of {list(SPLITS)}, got {split!r}.")
    if configured and task in configured:
        return
    key, _ = SPLITS[split]
    available = getattr(modelpool, f"_{key}", None)
    if not available or task not in available:
        raise ValueError(
            f"task '{task}' has no calibration data: add `{key}.{task}` to the modelpool config "
            f"(calibration_split={split!r}) or set `method.calibration_datasets.{task}` (a dataset path or config)."
        )


def warn_test_leakage(task: str, split: str, source: str) -> None:
    """Log a warning when calibration reads a test split (the evaluation data)."""
    if split == "test":
        log.warning(
            "task '%s': PAVE calibrates on %s: TEST-SET LEAKAGE (the official ViT protocol does this; "
            "results are not a clean evaluation). Use calibration_split=train or validation otherwise.",
            task, source,
        )


def load_preprocessor(modelpool: Any) -> Any:
    """The pool's image processor or tokenizer (pad token defaulting to EOS); for FusionBench's
    OpenCLIPVisionModelPool, its test_processor (the encoder's val_preprocess: deterministic, where
    train_preprocess augments at random) as an `ImageTransform`."""
    if getattr(modelpool, "_processor", None) is not None and hasattr(modelpool, "load_processor"):
        return modelpool.load_processor()
    if isinstance(getattr(type(modelpool), "test_processor", None), property):
        return ImageTransform(modelpool.test_processor)
    config = getattr(modelpool, "_tokenizer", None)
    if isinstance(config, str):
        tokenizer = AutoTokenizer.from_pretrained(config)
    elif isinstance(config, Mapping):
        tokenizer = instantiate(config)
    elif hasattr(modelpool, "load_tokenizer"):
        tokenizer = modelpool.load_tokenizer()
    else:
        tokenizer = None
    if not callable(tokenizer):
        raise ValueError(
            f"{type(modelpool).__name__} provides neither a processor nor a tokenizer; PAVE needs one "
            "to turn calibration samples into model inputs (set `processor` or `tokenizer` in the modelpool)."
        )
    if getattr(tokenizer, "pad_token", "") is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
