"""Synthetic classification tasks for the tiny offline model zoo.

Three image tasks (colour, shape, stripe direction; 32x32 RGB) and three text tasks (sentiment, topic,
weather; short bags of words prefixed by a task word). Each task is learnable by a two-layer model in a
few dozen steps, and the tasks share inputs' statistics only partly, so merged models sit between the
pretrained and the fine-tuned ones — what a merging test needs. The ``*_classnames`` / ``templates``
attributes follow FusionBench's CLIPTemplateFactory module convention.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np

IMAGE_SIZE = 32

templates: list[Callable[[str], str]] = [lambda c: f"a photo of a {c}.", lambda c: f"a {c}."]

tiny_color_classnames = ["red", "green", "blue", "yellow"]
tiny_shape_classnames = ["square", "circle", "cross", "ring"]
tiny_stripes_classnames = ["horizontal", "vertical", "diagonal", "checker"]

IMAGE_TASKS: dict[str, list[str]] = {
    "tiny_color": tiny_color_classnames,
    "tiny_shape": tiny_shape_classnames,
    "tiny_stripes": tiny_stripes_classnames,
}

_RGB = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.1, 1.0), "yellow": (1.0, 1.0, 0.1)}


def _color(label: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(_RGB[tiny_color_classnames[label]]) * rng.uniform(0.6, 1.0)
    img = base[None, None, :] * rng.uniform(0.5, 1.0, (IMAGE_SIZE, IMAGE_SIZE, 1))
    return img


def _shape(label: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE].astype(float)
    cy, cx = rng.uniform(12, 20, 2)
    r = rng.uniform(6, 10)
    dy, dx = np.abs(yy - cy), np.abs(xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    name = tiny_shape_classnames[label]
    if name == "square":
        mask = (dy < r) & (dx < r)
    elif name == "circle":
        mask = dist < r
    elif name == "cross":
        mask = ((dy < 2) & (dx < r)) | ((dx < 2) & (dy < r))
    else:
        mask = (dist < r) & (dist > r - 3)
    img = np.repeat(mask[..., None].astype(float), 3, axis=2) * rng.uniform(0.5, 1.0, 3)
    return img


def _stripes(label: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    period = int(rng.integers(4, 9))
    phase = int(rng.integers(0, period))
    name = tiny_stripes_classnames[label]
    if name == "horizontal":
        mask = ((yy + phase) // (period // 2)) % 2
    elif name == "vertical":
        mask = ((xx + phase) // (period // 2)) % 2
    elif name == "diagonal":
        mask = ((xx + yy + phase) // (period // 2)) % 2
    else:
        mask = (((xx + phase) // (period // 2)) + ((yy + phase) // (period // 2))) % 2
    img = np.repeat(mask[..., None].astype(float), 3, axis=2) * rng.uniform(0.4, 1.0, 3)
    return img


_IMAGE_DRAWERS = {"tiny_color": _color, "tiny_shape": _shape, "tiny_stripes": _stripes}


def make_image_examples(task: str, n: int, seed: int) -> list[dict]:
    """``n`` examples ``{"image": PIL.Image, "label": int}`` with balanced labels, noisy, seeded."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    num_classes = len(IMAGE_TASKS[task])
    examples = []
    for i in range(n):
        label = i % num_classes
        img = _IMAGE_DRAWERS[task](label, rng) + rng.normal(0, 0.08, (IMAGE_SIZE, IMAGE_SIZE, 3))
        pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        examples.append({"image": Image.fromarray(pixels), "label": label})
    return examples


TEXT_TASKS: dict[str, dict] = {
    "sentiment": {
        "labels": ["positive", "negative"],
        "cues": [["good", "great", "happy", "nice", "love"], ["bad", "awful", "sad", "poor", "hate"]],
    },
    "topic": {
        "labels": ["animal", "vehicle", "food"],
        "cues": [
            ["cat", "dog", "horse", "bird", "fish"],
            ["car", "bus", "train", "plane", "boat"],
            ["bread", "apple", "rice", "soup", "cake"],
        ],
    },
    "weather": {
        "labels": ["sun", "rain"],
        "cues": [["sunny", "warm", "bright", "dry", "clear"], ["wet", "cloudy", "storm", "cold", "umbrella"]],
    },
}
FILLER_WORDS = ["the", "a", "it", "was", "and", "so", "very", "today", "we", "saw", "this", "that"]


def text_vocabulary() -> list[str]:
    """Every word any text task can produce (task words, cues, fillers, label words)."""
    words = list(FILLER_WORDS)
    for task, spec in TEXT_TASKS.items():
        words.append(task)
        words.extend(spec["labels"])
        for cue in spec["cues"]:
            words.extend(cue)
    return list(dict.fromkeys(words))


def make_text_examples(task: str, n: int, seed: int, length: int = 8) -> list[dict]:
    """``n`` examples ``{"text": str, "label": int}``: the task word, then cue words of the label
    mixed with fillers and cue words of other tasks (distractors)."""
    rng = random.Random(seed)
    spec = TEXT_TASKS[task]
    other_cues = [w for t, s in TEXT_TASKS.items() if t != task for cue in s["cues"] for w in cue]
    examples = []
    for i in range(n):
        label = i % len(spec["labels"])
        words = rng.sample(spec["cues"][label], 3)
        words += rng.choices(FILLER_WORDS, k=length - 5) + rng.sample(other_cues, 2)
        rng.shuffle(words)
        examples.append({"text": " ".join([task] + words), "label": label})
    return examples
