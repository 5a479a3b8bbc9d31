"""The GLUE-protocol MiniLM zoo on a tiny encoder: the zoo is built by the real recipe (real text tasks,
GLUE-style full fine-tuning with a fresh head per task) from a tiny random BERT in seconds, then used
through its yaml as FusionBench uses it. The real zoo (minutes per seed) is built by benchmarks/, never here."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fusion_bench_pave.assets import ensure_zoo, registry
from fusion_bench_pave.assets.text_tasks import TEXT_TASKS, classnames
from fusion_bench_pave.taskpool.report import accuracy_and_loss

from conftest import compose_fusion_bench
from reference.tiny_models import bert
from test_zoo_text import WORDS, needs_text_assets

pytestmark = needs_text_assets
TINY = dict(n_train=24, n_val=8, n_test=32, epochs=1)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A random 2-layer BertModel (pooler included) and a word-level tokenizer, saved like the hub checkpoint."""
    from transformers import BertTokenizer

    path = tmp_path_factory.mktemp("tiny-minilm")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    bert(0, vocab_size=len(vocab)).save_pretrained(path)
    BertTokenizer(vocab=vocab).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_zoos(tiny_source):
    """Registers tiny GLUE zoos (seeds 0 and 1, and seed 0 again under another name); -> name -> seed."""
    seeds = {"tiny_minilm_glue_s0": 0, "tiny_minilm_glue_s1": 1, "tiny_minilm_glue_s0_again": 0}
    with pytest.MonkeyPatch.context() as patch:
        for name, seed in seeds.items():
            patch.setitem(registry.ZOOS, name, registry.Zoo("fusion_bench_pave.assets.minilm_glue", f"tiny/{name}",
                                                            {"seed": seed, "source": tiny_source, **TINY}))
        yield seeds


def weights(zoo, task: str) -> dict[str, torch.Tensor]:
    return load_file(zoo / "models" / task / "model.safetensors")


def test_builds_are_deterministic_for_a_seed_and_differ_across_seeds(tiny_zoos):
    a, again, b = (ensure_zoo(n) for n in ("tiny_minilm_glue_s0", "tiny_minilm_glue_s0_again", "tiny_minilm_glue_s1"))
    for task in TEXT_TASKS:
        wa, w_again, wb = weights(a, task), weights(again, task), weights(b, task)
        assert wa.keys() == w_again.keys() and all(torch.equal(wa[k], w_again[k]) for k in wa)
        assert not torch.equal(wa["classifier.weight"], wb["classifier.weight"])
        assert not torch.equal(wa["bert.encoder.layer.0.attention.self.query.weight"],
                               wb["bert.encoder.layer.0.attention.self.query.weight"])
    for split in ("train", "val", "test"):  # the data is the same for every seed
        assert (a / "data" / "news_sci" / split / "data-00000-of-00001.arrow").read_bytes() == \
            (b / "data" / "news_sci" / split / "data-00000-of-00001.arrow").read_bytes()


def test_every_parameter_is_fine_tuned_and_each_task_has_its_own_head(tiny_zoos):
    zoo = ensure_zoo("tiny_minilm_glue_s0")
    pretrained = load_file(zoo / "pretrained" / "model.safetensors")
    assert any(k.startswith("pooler.") for k in pretrained)  # BERT's head reads the pooler: it is body
    for task in TEXT_TASKS:
        tuned = weights(zoo, task)
        assert tuned["classifier.weight"].shape == (len(classnames(task)), pretrained["pooler.dense.weight"].shape[0])
        params = [k for k in pretrained if k != "embeddings.position_ids"]
        unchanged = [k for k in params if torch.equal(pretrained[k], tuned[f"bert.{k}"])]
        assert not unchanged, (task, unchanged)


def _pools(zoo_name: str, split: str = "zoo_minilm_glue"):
    from fusion_bench.utils import instantiate

    cfg = compose_fusion_bench(["method=pave_ta", "modelpool=zoo_minilm_glue_s1", f"modelpool.zoo={zoo_name}",
                                f"taskpool={split}", "method.rho=1.0", "method.num_samples=8", "method.max_length=32",
                                "method.cache_dir=null"])
    return instantiate(cfg.modelpool, _recursive_=False), instantiate(cfg.taskpool, _recursive_=False), cfg


def test_each_body_scores_as_its_own_classifier_and_every_task_uses_its_own_head(tiny_zoos):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    modelpool, taskpool, _ = _pools("tiny_minilm_glue_s0")
    zoo = ensure_zoo("tiny_minilm_glue_s0")
    tokenizer = AutoTokenizer.from_pretrained(zoo / "pretrained")
    pretrained = modelpool.load_model("_pretrained_")
    report = taskpool.evaluate(pretrained)
    for task in TEXT_TASKS:
        rows = modelpool.load_test_dataset(task)
        enc = tokenizer(list(rows["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = torch.tensor(rows["label"])
        classifier = AutoModelForSequenceClassification.from_pretrained(zoo / "models" / task).eval()
        with torch.no_grad():
            own = accuracy_and_loss([(classifier(**enc).logits, labels)], task)["accuracy"]
            classifier.bert = pretrained  # the task's head on the pretrained body (module swap)
            on_pretrained = accuracy_and_loss([(classifier(**enc).logits, labels)], task)["accuracy"]
        body = modelpool.load_model(task)
        assert taskpool.evaluate(body)[task]["accuracy"] == own
        assert report[task]["accuracy"] == on_pretrained
    assert len(rows) == TINY["n_test"]


def test_pave_and_task_arithmetic_run_end_to_end_on_the_zoo(tiny_zoos):
    """PAVE at rho = 1 calibrates on the zoo's train splits and reproduces Task Arithmetic bit for bit."""
    from fusion_bench.method import TaskArithmeticAlgorithm
    from fusion_bench.utils import instantiate

    modelpool, taskpool, cfg = _pools("tiny_minilm_glue_s1", "zoo_minilm_glue_val")
    merged = instantiate(cfg.method, _recursive_=False).run(modelpool)
    merged = merged["model"] if isinstance(merged, dict) else merged
    plain = TaskArithmeticAlgorithm(scaling_factor=0.3).run(copy.deepcopy(modelpool))
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, merged.state_dict()[name]), name
    report = taskpool.evaluate(merged)
    assert set(report) == {"model_info", "average", *TEXT_TASKS}
    assert len(modelpool.load_test_dataset("reuters_r8")) == TINY["n_test"]  # test split of the pool
    assert len(taskpool.test_datasets) == len(TEXT_TASKS)


def test_seed_pools_differ_only_in_their_zoo():
    pools = [compose_fusion_bench([f"modelpool=zoo_minilm_glue_s{s}"]).modelpool for s in range(3)]
    assert [p.zoo for p in pools] == [f"minilm_glue_s{s}" for s in range(3)]
    assert [f"minilm_glue_s{s}" in registry.ZOOS for s in range(3)] == [True] * 3
    raw = [OmegaConf.to_container(p, resolve=False) for p in pools]  # resolving would build the real zoos
    for r in raw[1:]:
        assert {k: v for k, v in r.items() if k != "zoo"} == {k: v for k, v in raw[0].items() if k != "zoo"}
    assert list(pools[0].models) == ["_pretrained_", *TEXT_TASKS]
    for split in ("zoo_minilm_glue", "zoo_minilm_glue_val"):
        tp = compose_fusion_bench([f"taskpool={split}"]).taskpool
        assert tp._target_ == "fusion_bench_pave.taskpool.ClassificationHeadsTaskPool"
        assert list(tp.classifiers) == list(tp.test_datasets) == list(TEXT_TASKS)
        for task in TEXT_TASKS:
            assert tp.classifiers._get_node(task)._value() == f"${{fbp_zoo:${{modelpool.zoo}}}}/models/{task}"
