"""Layer-by-layer statistics of causal LMs read from safetensors == collect_covariance on the whole model."""

from __future__ import annotations

import pytest
import torch

from fusion_bench_pave.pave import causal_lm_statistics
from fusion_bench_pave.pave.causal_lm_statistics import collect_causal_lm_covariance, iter_causal_lm_covariance
from fusion_bench_pave.pave.covariance import collect_covariance
from reference.tiny_models import decoder

# Mistral with a sliding window shorter than the sequences; Qwen2 mixing full and sliding-window layers
KINDS = {
    "mistral": dict(sliding_window=5),
    "llama": dict(),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "llama_tied": dict(tie_word_embeddings=True),
}


def padded_batches(seed: int = 0) -> list[tuple[dict, torch.Tensor]]:
    """Three batches of 2 x 9 tokens: left padding, right padding, none."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for pad in ("left", "right", None):
        ids = torch.randint(0, 64, (2, 9), generator=generator)
        mask = torch.ones(2, 9, dtype=torch.long)
        if pad == "left":
            mask[1, :4] = 0
        elif pad == "right":
            mask[0, 6:] = 0
        out.append(({"input_ids": ids, "attention_mask": mask}, mask))
    return out


def saved(tmp_path, kind: str):
    model = decoder(kind.removesuffix("_tied"), num_hidden_layers=3, **KINDS[kind])
    model.save_pretrained(tmp_path / kind, max_shard_size="40KB")  # sharded, as real checkpoints are
    assert (tmp_path / kind / "model.safetensors.index.json").exists()
    return model, tmp_path / kind


def assert_same(whole, streamed) -> None:
    # Bit-equal, not close: each decoder layer runs the same module code on the same inputs (the
    # masks and rotary embeddings come from the installed transformers' own forward) and the same
    # CovarianceCollector folds them, so every kernel sees the same operands in the same order.
    assert list(streamed.input_of.items()) == list(whole.input_of.items())
    assert streamed.count == whole.count
    assert streamed.xtx.keys() == whole.xtx.keys()
    for key in whole.xtx:
        assert torch.equal(streamed.xtx[key], whole.xtx[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_statistics_equal_the_whole_model_collection(tmp_path, kind):
    model, path = saved(tmp_path, kind)
    whole = collect_covariance(model, padded_batches())
    streamed = collect_causal_lm_covariance(path, padded_batches(), progress=False)
    assert_same(whole, streamed)
    assert "lm_head" in streamed.input_of and "model.layers.2.mlp.down_proj" in streamed.input_of
    assert streamed.input_of["model.layers.1.self_attn.v_proj"] == "model.layers.1.self_attn.q_proj"
    assert streamed.count["lm_head"] == sum(int(mask.sum()) for _, mask in padded_batches()) < 3 * 2 * 9


def test_the_attention_mask_reaches_attention(tmp_path):
    # without the attention mask padding is attended to: layer 0's q_proj input (embeddings) is the same,
    # its o_proj input (attention output) is not
    model, path = saved(tmp_path, "llama")
    masked = collect_causal_lm_covariance(path, padded_batches(), progress=False)
    unpadded = [({"input_ids": inputs["input_ids"]}, mask) for inputs, mask in padded_batches()]
    no_attention_mask = collect_causal_lm_covariance(path, unpadded, progress=False)
    assert_same(collect_covariance(model, unpadded), no_attention_mask)
    key = "model.layers.0.self_attn.o_proj"
    assert not torch.allclose(masked.xtx[key], no_attention_mask.xtx[key])
    assert torch.equal(masked.xtx["model.layers.0.self_attn.q_proj"], no_attention_mask.xtx["model.layers.0.self_attn.q_proj"])


def test_max_rows_include_filter_and_dtype_match_the_whole_model(tmp_path):
    model, path = saved(tmp_path, "mistral")
    include = lambda name, module: "k_proj" not in name and name != "lm_head"  # noqa: E731
    kwargs = dict(include=include, dtype=torch.float32, max_rows=20)
    whole = collect_covariance(model, padded_batches(), **kwargs)
    streamed = collect_causal_lm_covariance(path, padded_batches(), progress=False, **kwargs)
    assert_same(whole, streamed)
    assert set(streamed.count.values()) == {20} and "lm_head" not in streamed.input_of
    assert streamed.xtx["model.layers.0.self_attn.q_proj"].dtype == torch.float32


def test_one_decoder_layer_holds_weights_at_a_time(tmp_path, monkeypatch):
    _, path = saved(tmp_path, "mistral")
    layers: list = []  # decoder layers given weights so far
    live_at_load: list[int] = []  # how many of them held weights when the next one was loaded
    load = causal_lm_statistics.load_module_

    def tracked_load(module, prefix, *args, **kwargs):
        if ".layers." in prefix:
            live_at_load.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers))
            layers.append(module)
        return load(module, prefix, *args, **kwargs)

    monkeypatch.setattr(causal_lm_statistics, "load_module_", tracked_load)
    parts = list(iter_causal_lm_covariance(path, padded_batches(), progress=False))
    assert [name for name, _ in parts] == ["model.layers.0", "model.layers.1", "model.layers.2", "lm_head"]
    assert live_at_load == [0, 0, 0]
    assert all(p.device.type == "meta" for layer in layers for p in layer.parameters())


def test_bad_inputs_fail_clearly(tmp_path):
    model, _ = saved(tmp_path, "mistral")
    state = dict(model.state_dict())
    with pytest.raises(ValueError, match="needs its config"):
        collect_causal_lm_covariance(state, padded_batches(), progress=False)
    with pytest.raises(ValueError, match="no calibration batches"):
        collect_causal_lm_covariance(state, [], config=model.config, progress=False)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        collect_causal_lm_covariance(state, padded_batches(), config=model.config, progress=False)
