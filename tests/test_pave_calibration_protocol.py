"""The official calibration protocol's pieces: which split PAVE calibrates on (load_calibration_dataset)
and the first N token rows with padding (iter_batches + the covariance collector's max_rows)."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from fusion_bench.modelpool import BaseModelPool
from omegaconf import OmegaConf
from torch import nn

from fusion_bench_pave.pave.calibration import iter_batches, load_calibration_dataset
from fusion_bench_pave.pave.covariance import collect_covariance
from reference.official_pave import collect_layer_inputs
from reference.tiny_models import WORDS, decoder, tokenizer

LOGGER = "fusion_bench_pave.pave.calibration"


def saved(tmp_path, name: str) -> str:
    """A one-column text dataset whose rows name it, saved to disk; returns its path."""
    path = str(tmp_path / name)
    datasets.Dataset.from_dict({"text": [f"{name} {i}" for i in range(3)]}).save_to_disk(path)
    return path


def pool(tmp_path, splits=("train", "val", "test")) -> BaseModelPool:
    """A pool of tasks a and b whose train/val/test datasets are distinct saved datasets."""
    keys = {split: OmegaConf.create({task: {"_target_": "datasets.load_from_disk",
                                            "dataset_path": saved(tmp_path, f"{task}_{split}")} for task in "ab"})
            for split in splits}
    return BaseModelPool({"a": None, "b": None}, **{f"{split}_datasets": keys[split] for split in keys})


@pytest.mark.parametrize("split, stored", [("train", "train"), ("validation", "val"), ("test", "test")])
def test_each_split_reads_its_pool_key(tmp_path, caplog, split, stored):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_calibration_dataset(pool(tmp_path), "b", None, split)
    assert dataset["text"] == [f"b_{stored} {i}" for i in range(3)]
    leakage = [r for r in caplog.records if "TEST-SET LEAKAGE" in r.getMessage()]
    if split == "test":
        assert len(leakage) == 1 and leakage[0].levelno == logging.WARNING
        assert "task 'b'" in leakage[0].getMessage() and "test_datasets.b" in leakage[0].getMessage()
    else:
        assert not leakage


def test_train_is_the_default(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_calibration_dataset(pool(tmp_path), "a")["text"][0] == "a_train 0"
    assert not caplog.records


@pytest.mark.parametrize("split, key", [("train", "train_datasets"), ("validation", "val_datasets"),
                                        ("test", "test_datasets")])
def test_missing_pool_key_names_the_task_and_the_key(tmp_path, split, key):
    others = tuple(s for s in ("train", "val", "test") if not key.startswith(s))
    with pytest.raises(ValueError, match=rf"task 'b' has no calibration data: add `{key}\.b` to the modelpool "
                                         rf"config \(calibration_split='{split}'\)"):
        load_calibration_dataset(pool(tmp_path, others), "b", None, split)
    partial = pool(tmp_path / "partial")
    getattr(partial, f"_{key}").pop("b")
    with pytest.raises(ValueError, match=rf"`{key}\.b`"):
        load_calibration_dataset(partial, "b", None, split)
    assert load_calibration_dataset(partial, "a", None, split)["text"]  # the other task still loads


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"calibration_split must be one of \['train', 'validation', 'test'\], got 'val'"):
        load_calibration_dataset(pool(tmp_path), "a", None, "val")


def test_configured_dataset_wins_and_says_when_the_split_does_not_apply(tmp_path, caplog):
    configured, tasks = {"a": saved(tmp_path, "own")}, pool(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_calibration_dataset(tasks, "a", configured)["text"][0] == "own 0"
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_calibration_dataset(tasks, "a", configured, "validation")["text"][0] == "own 0"
    (record,) = caplog.records
    assert "calibration_split='validation' does not apply" in record.getMessage()
    # tasks without a configured dataset still read the pool's split
    assert load_calibration_dataset(tasks, "b", configured, "validation")["text"][0] == "b_val 0"


def test_configured_dataset_name_is_loaded_at_the_split(tmp_path, caplog, monkeypatch):
    """A name that is not a saved dataset goes to datasets.load_dataset(name, split=split); a local
    folder of CSV files stands in for a hub dataset."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "csv"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text(f"text\n{split} row\n")
    for split in ("train", "validation", "test"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert load_calibration_dataset(None, "a", {"a": str(folder)}, split)["text"] == [f"{split} row"]
        leakage = [r.getMessage() for r in caplog.records if "TEST-SET LEAKAGE" in r.getMessage()]
        assert leakage == ([f"task 'a': PAVE calibrates on split 'test' of {folder}: TEST-SET LEAKAGE (the official "
                            "ViT protocol does this; results are not a clean evaluation). Use calibration_split=train "
                            "or validation otherwise."] if split == "test" else [])


@pytest.mark.parametrize("padding, rows", [("longest", 40), ("max_length", 24)])
def test_first_rows_with_padding_are_the_official_rows(padding, rows):
    """mask_padding=False with max_rows=N keeps the first N token rows of the batches in order,
    padding tokens included: the rows the official hooks store and cut to N. With max_length padding
    and N = max_length (the official LLM path, 512) that is exactly the first text padded to N."""
    texts = [" ".join(WORDS[i : i + length]) for i, length in enumerate([3, 9, 5, 12, 2, 7])]
    data = datasets.Dataset.from_dict({"text": texts})
    model = decoder("mistral", lm_head=False, pad_token_id=0, eos_token_id=1, bos_token_id=1, sliding_window=None)
    batches = list(iter_batches(data, range(len(texts)), tokenizer(), model, "a", batch_size=2, max_length=24,
                                mask_padding=False, padding=padding))
    lengths = {b["input_ids"].shape[1] for b, _ in batches}
    assert lengths == ({24} if padding == "max_length" else {9, 12, 7})
    assert any(not b["attention_mask"].all() for b, _ in batches)  # there is padding to count
    include = lambda name, module: isinstance(module, nn.Linear)  # noqa: E731
    ours = collect_covariance(model, batches, include, torch.float64, max_rows=rows)
    official = collect_layer_inputs(model, [b for b, _ in batches], rows)
    assert set(official) == set(ours.input_of)
    for layer, x in official.items():
        assert x.shape[0] == rows and ours.count[ours.input_of[layer]] == rows
        x = x.double()
        torch.testing.assert_close(ours.covariance(layer), x.T @ x / rows, rtol=1e-12, atol=1e-14)
    if padding == "max_length":  # the first text alone: 3 real tokens, then 21 padding tokens
        first = {key: value[:1] for key, value in batches[0][0].items()}
        assert first["attention_mask"][0].tolist() == [1] * 3 + [0] * 21
        # a batch of one runs other matmul shapes than a batch of two: float32 rounding only
        for layer, x in collect_layer_inputs(model, [first], rows).items():
            torch.testing.assert_close(official[layer], x, rtol=1e-5, atol=1e-6)
