"""Does the program's task pool evaluate the kind of model the model pool holds?

FusionBench instantiates the task pool before ``method.run`` but uses it only after the merge, so a
T5 pool with a CLIP task pool fails after all the merging work. Algorithms call
``check_taskpool_fits`` with the pool's pretrained model before any work instead.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from fusion_bench.taskpool import CLIPVisionModelTaskPool

from fusion_bench_pave.taskpool.classification_heads_taskpool import ClassificationHeadsTaskPool
from fusion_bench_pave.taskpool.label_words_taskpool import LabelWordsTaskPool
from fusion_bench_pave.taskpool.sentence_encoder_taskpool import SentenceEncoderTaskPool

IMAGE_MODEL = "image models (pixel_values input)"
LANGUAGE_MODEL = "language models (input_ids input, LM head)"
TEXT_ENCODER = "text encoders (input_ids input, no LM head)"

#: What each task pool feeds the model and reads from it (subclasses included).
TASKPOOL_MODELS = (
    (CLIPVisionModelTaskPool, IMAGE_MODEL),
    (LabelWordsTaskPool, LANGUAGE_MODEL),
    (SentenceEncoderTaskPool, TEXT_ENCODER),
    (ClassificationHeadsTaskPool, TEXT_ENCODER),
)


def model_kind(model: nn.Module) -> Optional[str]:
    """IMAGE_MODEL, LANGUAGE_MODEL or TEXT_ENCODER for a Hugging Face model, from its main input and
    whether it has output embeddings; None for any other model."""
    main_input = getattr(model, "main_input_name", None)
    if main_input == "pixel_values":
        return IMAGE_MODEL
    if main_input == "input_ids" and callable(getattr(model, "get_output_embeddings", None)):
        return LANGUAGE_MODEL if model.get_output_embeddings() is not None else TEXT_ENCODER
    return None


def taskpool_kind(taskpool: Any) -> Optional[str]:
    """The kind of model ``taskpool`` evaluates, None for a task pool not in TASKPOOL_MODELS."""
    return next((kind for cls, kind in TASKPOOL_MODELS if isinstance(taskpool, cls)), None)


def hydra_choice(group: str) -> str:
    """`` (group=<name>)`` as chosen on the command line, or '' outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # HydraConfig not set: called from Python
        return ""
    return f" ({group}={choice})" if choice else ""


def check_taskpool_fits(program: Any, modelpool: Any, model: nn.Module | str) -> None:
    """ValueError naming both pools if the task pool of ``program`` (FusionBench sets it before
    ``method.run``) cannot evaluate ``model`` (the pool's pretrained model, or its kind). Unknown
    task pools or models are not checked."""
    taskpool = getattr(program, "taskpool", None)
    expected = taskpool_kind(taskpool) if taskpool is not None else None
    kind = model if isinstance(model, str) else model_kind(model)
    if expected is None or kind is None or kind == expected:
        return
    which = "" if isinstance(model, str) else f" (its pretrained model is a {type(model).__name__})"
    raise ValueError(
        f"the task pool {type(taskpool).__name__}{hydra_choice('taskpool')} evaluates {expected}, but the "
        f"model pool {type(modelpool).__name__}{hydra_choice('modelpool')} holds {kind}{which}; choose "
        "a task pool made for this model pool (e.g. modelpool=tiny_t5 taskpool=tiny_t5)."
    )
