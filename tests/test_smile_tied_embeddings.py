"""Generic SMILE models with tied input/output embeddings (T5, GPT-2, Gemma2, tied Llama / Qwen2):
saved once per tied group, reloaded with the ties restored, identical outputs, reusable model_path."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench_pave.io.smile import MANIFEST, WEIGHTS, load_smile_model, save_smile_model, tied_tensors
from fusion_bench_pave.smile import SmileLinear, upscale_model
from fusion_bench_pave.smile.algorithm import SmileUpscalingAlgorithm
from reference.tiny_models import clip_vision, decoder, noisy_copies, t5


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=64)).eval()


# name -> (builder, the tied group every saved model of it holds: the input embedding(s) and lm_head)
TIED = {
    "t5": (lambda: t5(tie_word_embeddings=True),
           ["decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight", "shared.weight"]),
    "llama": (lambda: decoder("llama", tie_word_embeddings=True), ["lm_head.weight", "model.embed_tokens.weight"]),
    "qwen2": (lambda: decoder("qwen2", tie_word_embeddings=True), ["lm_head.weight", "model.embed_tokens.weight"]),
    "gemma2": (lambda: decoder("gemma2"), ["lm_head.weight", "model.embed_tokens.weight"]),
    "gpt2": (gpt2, ["lm_head.weight", "transformer.wte.weight"]),
}
# None: every changed Linear the default selects; [".*"]: every Linear by name, lm_head included
TARGETS = {"default": None, "all": [r".*"]}


def logits(model) -> torch.Tensor:
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=x, decoder_input_ids=x).logits
        return model(input_ids=x).logits


@pytest.fixture(scope="module", params=sorted(TIED))
def family(request):
    build, group = TIED[request.param]
    pre = build()
    assert [g for g in tied_tensors(pre) if "lm_head.weight" in g] == [group]  # really tied
    return pre, noisy_copies(pre, 2, scale=0.02), group


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_save_load_restores_the_ties_and_the_outputs_bit_for_bit(tmp_path, family, target):
    pre, fts, group = family
    smile, _ = upscale_model(copy.deepcopy(pre), [copy.deepcopy(m) for m in fts], gate_k=2, k=4, top_k=1,
                             target_modules=TARGETS[target], progress=False)
    assert any(isinstance(m, SmileLinear) for m in smile.modules())
    assert group in tied_tensors(smile)  # the upscaled model keeps lm_head tied, SmileLinear or not
    save_smile_model(smile, tmp_path / "smile")
    assert group in json.loads((tmp_path / "smile" / MANIFEST).read_text())["tied"]
    with safe_open(tmp_path / "smile" / WEIGHTS, "pt") as stored:
        assert len(set(group) & set(stored.keys())) == 1  # stored once
    loaded = load_smile_model(copy.deepcopy(pre), tmp_path / "smile").eval()
    assert group in tied_tensors(loaded)
    assert loaded.state_dict().keys() == smile.state_dict().keys()
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in smile.state_dict().items())
    assert torch.equal(logits(loaded), logits(smile))
    assert not torch.equal(logits(loaded), logits(pre))


def test_manifest_without_tied_list_reloads_with_the_base_models_ties(tmp_path, family):
    pre, fts, group = family
    smile, _ = upscale_model(copy.deepcopy(pre), [copy.deepcopy(m) for m in fts], gate_k=2, k=4, target_modules=[r".*"],
                             progress=False)
    save_smile_model(smile, tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / MANIFEST).read_text())
    del manifest["tied"]  # as written before the list existed
    (tmp_path / "old" / MANIFEST).write_text(json.dumps(manifest))
    assert torch.equal(logits(load_smile_model(copy.deepcopy(pre), tmp_path / "old").eval()), logits(smile))


def test_second_run_with_the_same_model_path_loads_the_saved_model(tmp_path, family):
    pre, fts, _ = family
    pool = lambda: {"_pretrained_": copy.deepcopy(pre), **{f"m{i}": copy.deepcopy(m) for i, m in enumerate(fts)}}  # noqa: E731
    settings = dict(gate_k=2, k=4, top_k=2, target_modules=[r".*"], model_path=str(tmp_path / "smile"))
    first = SmileUpscalingAlgorithm(**settings).run(pool()).eval()
    saved = {p.name: p.read_bytes() for p in (tmp_path / "smile").iterdir()}
    again = SmileUpscalingAlgorithm(**settings).run(pool()).eval()
    assert {p.name: p.read_bytes() for p in (tmp_path / "smile").iterdir()} == saved  # loaded, not rewritten
    assert torch.equal(logits(again), logits(first))


def test_loading_into_another_architecture_names_what_is_missing(tmp_path):
    pre = decoder("qwen2", tie_word_embeddings=True)
    smile, _ = upscale_model(copy.deepcopy(pre), noisy_copies(pre, 2), gate_k=2, k=4, progress=False)
    save_smile_model(smile, tmp_path / "smile")
    with pytest.raises(ValueError, match=r"smile\.json: the base model has no module model\.layers\.0\.self_attn\.q_proj; load into the pretrained"):
        load_smile_model(clip_vision(), tmp_path / "smile")
    manifest = json.loads((tmp_path / "smile" / MANIFEST).read_text())
    manifest["tied"][0].append("model.embed_positions.weight")
    (tmp_path / "smile" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"smile\.json: tied tensors \['model\.embed_positions\.weight'\] are not in the base model"):
        load_smile_model(copy.deepcopy(pre), tmp_path / "smile")
