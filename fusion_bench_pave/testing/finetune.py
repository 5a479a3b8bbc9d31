"""Brief, seeded fine-tuning of the tiny models, one task each, with the evaluation's own heads.

CLIP: the vision tower is trained through FusionBench's zero-shot classifier (frozen text tower and
projections), as the CLIP task-arithmetic checkpoints were. Text models: the whole model is trained
on the label-word logits that LabelWordsTaskPool scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench_pave.taskpool.label_words import label_logits, label_token_ids


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator).tolist()


def finetune_clip_vision(clip_model, processor, examples: list[dict], classnames: list[str], templates,
                         steps: int, lr: float, seed: int) -> nn.Module:
    """Train ``clip_model.vision_model`` in place on ``examples``; returns the vision model."""
    from fusion_bench.models.hf_clip import HFCLIPClassifier

    classifier = HFCLIPClassifier(clip_model, processor=processor)
    classifier.set_classification_task(classnames, templates)
    clip_model.requires_grad_(False)
    vision = clip_model.vision_model
    vision.requires_grad_(True)
    pixels = processor(images=[e["image"] for e in examples], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([e["label"] for e in examples])
    optimizer = torch.optim.Adam(vision.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    vision.train()
    for idx in _batches(len(labels), 32, steps, generator):
        loss = F.cross_entropy(classifier(pixels[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vision.eval()
    return vision


def finetune_label_words(model: nn.Module, tokenizer, examples: list[dict], label_words: list[str],
                         steps: int, lr: float, seed: int) -> nn.Module:
    """Train ``model`` in place to put the highest label-word logit on each example's label."""
    label_ids = label_token_ids(tokenizer, label_words)
    enc = tokenizer([e["text"] for e in examples], return_tensors="pt", padding=True)
    labels = torch.tensor([e["label"] for e in examples])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for idx in _batches(len(labels), 32, steps, generator):
        logits = label_logits(model, enc["input_ids"][idx], enc["attention_mask"][idx], label_ids)
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model
