"""Build, once, and cache the tiny offline zoos that the tests, the demo configs and users share.

Layout of a zoo (``kind`` in clip | t5 | mistral)::

    <cache>/tiny/<kind>-v<RECIPE>/
        pretrained/            full model + tokenizer/processor (CLIPModel for clip)
        models/<task>/         fine-tuned copy (CLIPVisionModel for clip)
        data/<task>/{train,test}/   datasets.save_to_disk
        COMPLETE               written last

A zoo is built in a temporary sibling directory and renamed into place, under a file lock, so
concurrent runs (pytest workers, multirun jobs) never see a half-built zoo. The build runs with torch
held to one thread: MKL's GEMMs give other bits at other thread counts on some CPUs (AMD EPYC), so a
rebuild on one machine is bit-identical whatever the caller's thread count.
"""

from __future__ import annotations

from pathlib import Path

from fusion_bench_pave.testing import tiny_models, tiny_tasks
from fusion_bench_pave.threads import fixed_threads
from fusion_bench_pave.zoo.store import build_once, cache_root

RECIPE = 3
KINDS = ("clip", "t5", "mistral")
TRAIN_SIZE = {"clip": 128, "t5": 192, "mistral": 192}
TEST_SIZE = 64
STEPS = {"clip": 120, "t5": 60, "mistral": 60}
LR = {"clip": 1e-3, "t5": 3e-3, "mistral": 3e-3}


def task_names(kind: str) -> list[str]:
    return list(tiny_tasks.IMAGE_TASKS if kind == "clip" else tiny_tasks.TEXT_TASKS)


def ensure_tiny_zoo(kind: str, root: Path | None = None) -> Path:
    """Return the directory of the tiny ``kind`` zoo, building it first if it is missing."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny zoo {kind!r}; choose one of {KINDS}")
    target = (root or cache_root()) / "tiny" / f"{kind}-v{RECIPE}"
    return build_once(target, lambda staging: _build(kind, staging), f"recipe {RECIPE}\n")


def _save_dataset(examples: list[dict], path: Path, image: bool) -> None:
    import datasets

    features = datasets.Features(
        {"image" if image else "text": datasets.Image() if image else datasets.Value("string"),
         "label": datasets.Value("int64")}
    )
    datasets.Dataset.from_list(examples, features=features).save_to_disk(str(path))


@fixed_threads(1)
def _build(kind: str, out: Path) -> None:
    import torch

    torch.manual_seed(0)
    builder = {"clip": tiny_models.build_clip, "t5": tiny_models.build_t5, "mistral": tiny_models.build_mistral}
    builder[kind](out / "pretrained", seed=0)
    for i, task in enumerate(task_names(kind)):
        seed = 1000 * (i + 1)
        if kind == "clip":
            train = tiny_tasks.make_image_examples(task, TRAIN_SIZE[kind], seed)
            test = tiny_tasks.make_image_examples(task, TEST_SIZE, seed + 1)
        else:
            train = tiny_tasks.make_text_examples(task, TRAIN_SIZE[kind], seed)
            test = tiny_tasks.make_text_examples(task, TEST_SIZE, seed + 1)
        _save_dataset(train, out / "data" / task / "train", image=kind == "clip")
        _save_dataset(test, out / "data" / task / "test", image=kind == "clip")
        _finetune(kind, out, task, train, seed)


def _finetune(kind: str, out: Path, task: str, train: list[dict], seed: int) -> None:
    from fusion_bench_pave.testing.finetune import finetune_clip_vision, finetune_label_words

    pretrained = out / "pretrained"
    if kind == "clip":
        from transformers import CLIPModel, CLIPProcessor

        model = finetune_clip_vision(
            CLIPModel.from_pretrained(pretrained), CLIPProcessor.from_pretrained(pretrained), train,
            tiny_tasks.IMAGE_TASKS[task], tiny_tasks.templates, STEPS[kind], LR[kind], seed,
        )
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
        model = finetune_label_words(
            auto.from_pretrained(pretrained), AutoTokenizer.from_pretrained(pretrained), train,
            tiny_tasks.TEXT_TASKS[task]["labels"], STEPS[kind], LR[kind], seed,
        )
    model.save_pretrained(out / "models" / task)
