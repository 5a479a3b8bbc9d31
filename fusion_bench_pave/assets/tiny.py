"""The tiny offline zoos (``modelpool=tiny_clip|tiny_t5|tiny_mistral``) that the demo configs, users
and the tests share: a random two-layer model and three copies fine-tuned briefly on synthetic tasks.

Layout of a zoo (``kind`` in clip | t5 | mistral; registry names tiny_<kind>)::

    <cache>/tiny/<kind>-v<RECIPE>/
        pretrained/            full model + tokenizer/processor (CLIPModel for clip)
        models/<task>/         fine-tuned copy (CLIPVisionModel for clip)
        data/<task>/{train,test}/   datasets.save_to_disk
        COMPLETE               written last

CLIP: the vision tower is trained through FusionBench's zero-shot classifier (frozen text tower and
projections). Text models: the whole model is trained on the label-word logits that
LabelWordsTaskPool scores.

The build runs with torch held to one thread: MKL's GEMMs give other bits at other thread counts on
some CPUs (AMD EPYC), so a rebuild on one machine is bit-identical whatever the caller's thread count.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fusion_bench_pave.assets import tiny_models, tiny_tasks
from fusion_bench_pave.assets.finetune import finetune_clip_vision, train_through_head
from fusion_bench_pave.taskpool.label_words import label_logits, label_token_ids
from fusion_bench_pave.threads import fixed_threads

RECIPE = 3
TRAIN_SIZE = {"clip": 128, "t5": 192, "mistral": 192}
TEST_SIZE = 64
STEPS = {"clip": 120, "t5": 60, "mistral": 60}
LR = {"clip": 1e-3, "t5": 3e-3, "mistral": 3e-3}


def task_names(kind: str) -> list[str]:
    return list(tiny_tasks.IMAGE_TASKS if kind == "clip" else tiny_tasks.TEXT_TASKS)


def _save_dataset(examples: list[dict], path: Path, image: bool) -> None:
    import datasets

    features = datasets.Features(
        {"image" if image else "text": datasets.Image() if image else datasets.Value("string"),
         "label": datasets.Value("int64")}
    )
    datasets.Dataset.from_list(examples, features=features).save_to_disk(str(path))


@fixed_threads(1)
def build(out: Path, kind: str) -> None:
    """Write the tiny ``kind`` zoo into ``out``."""
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


def finetune_label_words(model: nn.Module, tokenizer, examples: list[dict], label_words: list[str],
                         steps: int, lr: float, seed: int) -> nn.Module:
    """Train all of ``model`` in place (Adam, batch 32) to put the highest label-word logit on each
    example's label."""
    label_ids = label_token_ids(tokenizer, label_words)
    enc = tokenizer([e["text"] for e in examples], return_tensors="pt", padding=True)
    labels = torch.tensor([e["label"] for e in examples])

    def logits(idx):
        return label_logits(model, enc["input_ids"][idx], enc["attention_mask"][idx], label_ids)

    return train_through_head(model, model.parameters(), logits, labels, steps, lr, seed, batch_size=32)


def _finetune(kind: str, out: Path, task: str, train: list[dict], seed: int) -> None:
    pretrained = out / "pretrained"
    if kind == "clip":
        from transformers import CLIPModel, CLIPProcessor

        clip_model, processor = CLIPModel.from_pretrained(pretrained), CLIPProcessor.from_pretrained(pretrained)
        pixels = processor(images=[e["image"] for e in train], return_tensors="pt")["pixel_values"]
        model = finetune_clip_vision(
            clip_model, processor, pixels, torch.tensor([e["label"] for e in train]),
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
