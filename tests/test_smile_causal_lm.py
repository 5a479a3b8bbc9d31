"""SMILE causal LMs: Auto-class round trip, streaming == in-memory, untrained layers, FusionBench layer oracle."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench.modelpool import BaseModelPool, CausalLMPool
from fusion_bench_pave.smile import SmileLinear
from fusion_bench_pave.smile.algorithm import SmileMistralUpscalingAlgorithm
from fusion_bench_pave.smile.causal_lm import SmileMistralConfig, SmileMistralForCausalLM
from fusion_bench_pave.smile.causal_lm.upscale import SmileSettings, upscale_causal_lm, upscale_causal_lm_checkpoint
from reference.tiny_models import decoder, noisy_copies

PROJ = r"_proj\.weight"
SMILE_KWARGS = dict(rank_of_router=4, rank_of_expert=8, num_experts_per_tok=2)
SMILE = SmileSettings(**SMILE_KWARGS)


@pytest.fixture(scope="module")
def mistral_family(tmp_path_factory):
    """Pretrained + 3 fine-tuned tiny Mistrals (layer 1 attention untouched), saved as sharded safetensors."""
    pre = decoder("mistral", num_hidden_layers=3)
    fts = noisy_copies(pre, 3, only=PROJ, skip=r"layers\.1\.self_attn")
    root = tmp_path_factory.mktemp("mistral")
    pre.save_pretrained(root / "base", max_shard_size="40KB")
    for i, m in enumerate(fts):
        m.save_pretrained(root / f"ft{i}", max_shard_size="40KB")
    return pre, fts, root


def ids(n: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(0))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def test_save_pretrained_from_pretrained_round_trip(tmp_path, mistral_family):
    pre, fts, _ = mistral_family
    model = upscale_causal_lm(pre, fts, SMILE, progress=False)
    assert isinstance(model, SmileMistralForCausalLM) and model.config.model_type == "smile_mistral"
    model.save_pretrained(tmp_path / "smile")
    assert json.loads((tmp_path / "smile" / "config.json").read_text())["architectures"] == ["SmileMistralForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smile").eval()
    assert type(reloaded) is SmileMistralForCausalLM
    assert reloaded.config.num_local_experts == 3 and reloaded.config.rank_of_expert == 8
    assert torch.equal(logits(model), logits(reloaded))
    # the untouched attention projections of layer 1 reload as zero-expert SmileLinears: exactly pretrained
    q = reloaded.model.layers[1].self_attn.q_proj
    assert isinstance(q, SmileLinear) and torch.count_nonzero(q.router) == 0 and torch.count_nonzero(q.expert_u) == 0
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), pre.model.layers[1].self_attn.q_proj(x))


def test_streaming_equals_in_memory_with_sharded_input_and_output(tmp_path, mistral_family):
    pre, fts, root = mistral_family
    assert (root / "base" / "model.safetensors.index.json").exists()  # the inputs really are sharded
    out = upscale_causal_lm_checkpoint(root / "base", [root / f"ft{i}" for i in range(3)], tmp_path / "out", SMILE,
                                       max_shard_bytes=100_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    streamed = AutoModelForCausalLM.from_pretrained(out).eval()
    in_memory = upscale_causal_lm(pre, fts, SMILE, progress=False)
    torch.testing.assert_close(logits(streamed), logits(in_memory), rtol=0, atol=0)
    assert (logits(streamed) - logits(pre)).abs().max() > 1e-3


def test_top1_dense_single_expert_reproduces_the_finetuned_model(mistral_family):
    pre, fts, _ = mistral_family
    model = upscale_causal_lm(pre, fts[:1], SmileSettings(rank_of_router=2, rank_of_expert=0), progress=False)
    torch.testing.assert_close(logits(model), logits(fts[0]), rtol=1e-5, atol=1e-5)
    full_rank = upscale_causal_lm(pre, fts[:1], SmileSettings(rank_of_router=2, rank_of_expert=16), progress=False)  # 16 = min dim (k/v_proj)
    assert (logits(full_rank) - logits(fts[0])).abs().max() > 1e-4  # q/o/mlp keep only rank 16 of 32: not exact
    torch.testing.assert_close(full_rank.model.layers[0].self_attn.k_proj(torch.eye(32)),
                               fts[0].model.layers[0].self_attn.k_proj(torch.eye(32)), rtol=1e-5, atol=1e-5)


def assert_projections_equal_fusion_bench(pre, fts, names: list[str]) -> None:
    """Our upscaled projections ``names`` of layer 0 equal FusionBench's ``upscale_to_smile_linear`` of them."""
    from fusion_bench.models.smile_moe.linear_from_hf_config import SmileLinear as FusionBenchSmileLinear
    from fusion_bench.models.smile_moe.linear_from_hf_config import upscale_to_smile_linear

    ours = upscale_causal_lm(pre, fts, SMILE, progress=False)
    cfg = SmileMistralConfig(num_local_experts=len(fts), **SMILE_KWARGS)
    for name in names:
        base = pre.model.layers[0].get_submodule(name)
        target = FusionBenchSmileLinear(cfg, base.in_features, base.out_features, bias=False)
        upscale_to_smile_linear(copy.deepcopy(base), [copy.deepcopy(m.model.layers[0].get_submodule(name)) for m in fts], target)
        xi = torch.randn(3, 7, base.in_features)
        with torch.no_grad():
            torch.testing.assert_close(ours.model.layers[0].get_submodule(name)(xi), target(xi), rtol=1e-5, atol=1e-5)


def test_projection_equals_fusion_bench_upscale_to_smile_linear(mistral_family):
    pre, fts, _ = mistral_family
    assert_projections_equal_fusion_bench(pre, fts, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])


def test_qwen2_with_biases_round_trips(tmp_path):
    pre = decoder("qwen2")
    fts = noisy_copies(pre, 2, only=r"_proj\.(weight|bias)")
    model = upscale_causal_lm(pre, fts, SMILE, progress=False)
    assert model.config.model_type == "smile_qwen2" and model.model.layers[0].self_attn.q_proj.expert_bias is not None
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(logits(model), logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()))


def test_model_dtype_bfloat16_streaming(tmp_path, mistral_family):
    _, _, root = mistral_family
    out = upscale_causal_lm_checkpoint(root / "base", [root / "ft0", root / "ft1"], tmp_path / "bf16",
                                       replace(SMILE, model_dtype=torch.bfloat16), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, mistral_family):
    pre, fts, root = mistral_family
    experts = [root / "ft0", root / "ft1"]
    with pytest.raises(ValueError, match=r"T=0"):
        upscale_causal_lm_checkpoint(root / "base", [], tmp_path / "a", SMILE, progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: gate_k=0 out of range \[1, 32\] for a 32x64 weight"):
        upscale_causal_lm_checkpoint(root / "base", experts, tmp_path / "a", SmileSettings(rank_of_router=0, rank_of_expert=8), progress=False)
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, 2\]"):
        upscale_causal_lm_checkpoint(root / "base", experts, tmp_path / "a", replace(SMILE, num_experts_per_tok=3))
    with pytest.raises(ValueError, match="nothing to upscale"):
        upscale_causal_lm_checkpoint(root / "base", [root / "base"], tmp_path / "a", replace(SMILE, num_experts_per_tok=1), progress=False)
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())  # atomic: no partial output
    bigger = decoder("mistral", num_hidden_layers=3)
    bigger.model.layers[2].mlp.up_proj = torch.nn.Linear(32, 48, bias=False)
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.up_proj: fine-tuned model 0 has weight shape \(48, 32\)"):
        upscale_causal_lm(pre, [bigger], replace(SMILE, num_experts_per_tok=1), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        upscale_causal_lm_checkpoint(root / "base", experts, tmp_path / "exists", SMILE, progress=False)


def test_algorithm_streams_from_causal_lm_pool_and_caches(tmp_path, mistral_family):
    pre, fts, root = mistral_family
    models = {"_pretrained_": str(root / "base"), **{f"ft{i}": str(root / f"ft{i}") for i in range(3)}}
    out = tmp_path / "smile"
    algo = SmileMistralUpscalingAlgorithm(model_path=str(out), **SMILE_KWARGS)
    streamed = algo.run(CausalLMPool(models, tokenizer=None))
    assert (out / "config.json").exists()
    in_memory = SmileMistralUpscalingAlgorithm(**SMILE_KWARGS).run(
        BaseModelPool({"_pretrained_": copy.deepcopy(pre), **{f"ft{i}": copy.deepcopy(m) for i, m in enumerate(fts)}}))
    assert torch.equal(logits(streamed), logits(in_memory))
    cached = SmileMistralUpscalingAlgorithm(model_path=str(out), **SMILE_KWARGS).run(CausalLMPool(models, tokenizer=None))
    assert torch.equal(logits(cached), logits(streamed))
    # the record fingerprints tensors, not files: the same models given in memory reuse the checkpoint
    loaded = SmileMistralUpscalingAlgorithm(model_path=str(out), **SMILE_KWARGS).run(
        BaseModelPool({"_pretrained_": copy.deepcopy(pre), **{f"ft{i}": copy.deepcopy(m) for i, m in enumerate(fts)}}))
    assert torch.equal(logits(loaded), logits(streamed))
    other = {**SMILE_KWARGS, "rank_of_expert": 16}
    with pytest.raises(ValueError, match=r"built differently \(rank_of_expert: saved 8, requested 16\); refusing to reuse it"):
        SmileMistralUpscalingAlgorithm(model_path=str(out), **other).run(CausalLMPool(models, tokenizer=None))
    rebuilt = SmileMistralUpscalingAlgorithm(model_path=str(out), overwrite=True, **other).run(CausalLMPool(models, tokenizer=None))
    assert rebuilt.config.rank_of_expert == 16
    assert json.loads((out / "smile_upscaling.json").read_text())["settings"]["rank_of_expert"] == 16
    reused = SmileMistralUpscalingAlgorithm(model_path=str(out), **other).run(CausalLMPool(models, tokenizer=None))
    assert torch.equal(logits(reused), logits(rebuilt))


def test_in_memory_path_refuses_foreign_files_before_upscaling(tmp_path, mistral_family, monkeypatch):
    from fusion_bench_pave.smile import algorithm

    pre, fts, _ = mistral_family
    out = tmp_path / "smile"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(algorithm, "upscale_causal_lm", lambda *a, **k: pytest.fail("upscaled before refusing"))
    pool = BaseModelPool({"_pretrained_": copy.deepcopy(pre), **{f"ft{i}": copy.deepcopy(m) for i, m in enumerate(fts)}})
    with pytest.raises(FileExistsError, match=r"smile holds files fusion_bench_pave did not write there .*notes\.txt"):
        SmileMistralUpscalingAlgorithm(model_path=str(out), overwrite=True, **SMILE_KWARGS).run(pool)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_hub_ids_resolve_to_snapshots_and_stream(tmp_path, mistral_family, monkeypatch):
    from fusion_bench_pave.modelpool import checkpoints
    from fusion_bench_pave.smile import algorithm

    _, _, root = mistral_family
    snapshots = {"org/base": root / "base", "org/ft0": root / "ft0", "org/ft1": root / "ft1"}
    monkeypatch.setattr(checkpoints, "snapshot_download", lambda repo_id, allow_patterns: str(snapshots[repo_id]))
    streamed = []
    real = algorithm.upscale_causal_lm_checkpoint
    monkeypatch.setattr(algorithm, "upscale_causal_lm_checkpoint", lambda *a, **kw: streamed.append(a) or real(*a, **kw))
    pool = CausalLMPool({"_pretrained_": "org/base", "ft0": "org/ft0", "ft1": "org/ft1"}, tokenizer=None)
    model = SmileMistralUpscalingAlgorithm(**SMILE_KWARGS).run(pool)
    assert streamed and streamed[0][0] == root / "base" and model.config.num_local_experts == 2


# kind -> config overrides: Gemma2 ties its embeddings by default, Phi3 has fused qkv_proj / gate_up_proj
FAMILIES = {"gemma2": {}, "phi3": {}, "llama": dict(tie_word_embeddings=True)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """Pretrained + 2 fine-tuned tiny decoders of one family (layer 1 MLP untouched), saved as safetensors."""
    kind = request.param
    pre = decoder(kind, **FAMILIES[kind])
    fts = noisy_copies(pre, 2, only=PROJ, skip=r"layers\.1\.mlp")
    root = tmp_path_factory.mktemp(kind)
    for name, model in [("base", pre), ("ft0", fts[0]), ("ft1", fts[1])]:
        model.save_pretrained(root / name)
    return kind, pre, fts, root


def test_family_auto_class_round_trip_and_streaming_equals_in_memory(tmp_path, family):
    kind, pre, fts, root = family
    in_memory = upscale_causal_lm(pre, fts, SMILE, progress=False)
    assert type(in_memory).__name__ == f"Smile{type(pre).__name__}" and in_memory.config.model_type == f"smile_{kind}"
    assert in_memory.config.tie_word_embeddings == pre.config.tie_word_embeddings
    in_memory.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is type(in_memory)
    assert torch.equal(logits(reloaded), logits(in_memory))
    streamed = AutoModelForCausalLM.from_pretrained(
        upscale_causal_lm_checkpoint(root / "base", [root / "ft0", root / "ft1"], tmp_path / "streamed", SMILE, progress=False)).eval()
    assert torch.equal(logits(streamed), logits(in_memory))  # the same smile_tensors ops on the same tensors
    assert (logits(streamed) - logits(pre)).abs().max() > 1e-3
    smile_layers = [n for n, m in streamed.named_modules() if isinstance(m, SmileLinear)]
    plain_projections = [n for n, _ in pre.named_modules() if n.endswith("_proj")]
    assert smile_layers == plain_projections  # every projection, fused ones as one layer each
    if pre.config.tie_word_embeddings:
        assert streamed.lm_head.weight.data_ptr() == streamed.model.embed_tokens.weight.data_ptr()


def test_family_top1_dense_single_expert_reproduces_the_finetuned_model(family):
    _, pre, fts, _ = family
    model = upscale_causal_lm(pre, fts[:1], SmileSettings(rank_of_router=2, rank_of_expert=0), progress=False)
    torch.testing.assert_close(logits(model), logits(fts[0]), rtol=1e-5, atol=1e-5)


def test_phi3_fused_projections_equal_fusion_bench_upscale_to_smile_linear():
    """Phi3's fused qkv_proj / gate_up_proj are upscaled as the single Linears they are, as FusionBench's
    upscale_to_smile_linear upscales any Linear (FusionBench has no SMILE Phi3 model to compare with)."""
    pre = decoder("phi3")
    assert_projections_equal_fusion_bench(pre, noisy_copies(pre, 3, only=PROJ), ["self_attn.qkv_proj", "mlp.gate_up_proj"])


# ranks above the 16-wide k/v projections of the tiny grouped-query decoders (hidden 32, MLP 32 -> 64)
WIDE = SmileSettings(num_experts_per_tok=2, rank_of_router=20, rank_of_expert=24)
GQA_FAMILIES = {"mistral": PROJ, "llama": PROJ, "qwen2": r"_proj\.(weight|bias)"}


@pytest.mark.parametrize("kind", sorted(GQA_FAMILIES))
def test_ranks_above_the_kv_width_are_clamped_per_projection_as_in_memory_smile_does(tmp_path, kind, caplog):
    """Streaming and the in-memory paths (causal-LM and generic ``smile_upscaling``) clamp each
    projection's ranks with the same rule, store them in the config, reload through the Auto classes
    and compute the same logits (the same smile_tensors ops on the same tensors)."""
    from fusion_bench_pave.smile import upscale_model

    pre = decoder(kind)
    fts = noisy_copies(pre, 2, only=GQA_FAMILIES[kind])
    for name, model in [("base", pre), ("ft0", fts[0]), ("ft1", fts[1])]:
        model.save_pretrained(tmp_path / name)
    with caplog.at_level("INFO", logger="fusion_bench_pave"):
        out = upscale_causal_lm_checkpoint(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "out", WIDE, progress=False)
    assert "ranks (gate_k, k) clamped to the layer's full rank, from (20, 24): model.layers.0.self_attn.k_proj (16, 16)" in caplog.text
    streamed = AutoModelForCausalLM.from_pretrained(out).eval()
    narrow = [f"layers.{i}.self_attn.{p}" for i in range(pre.config.num_hidden_layers) for p in ("k_proj", "v_proj")]
    assert streamed.config.layer_ranks == {key: [16, 16] for key in narrow}
    ranks = {n: (m.gate_k, m.k) for n, m in streamed.named_modules() if isinstance(m, SmileLinear)}
    assert {n: r for n, r in ranks.items() if r != (20, 24)} == {f"model.{key}": (16, 16) for key in narrow}

    generic, report = upscale_model(copy.deepcopy(pre), fts, gate_k=20, k=24, top_k=2, progress=False)
    assert report.ranks == ranks  # one rule (decompose.layer_ranks), the same layers
    in_memory = upscale_causal_lm(pre, fts, WIDE, progress=False)
    assert torch.equal(logits(streamed), logits(in_memory))
    assert torch.equal(logits(streamed), logits(generic))
    in_memory.save_pretrained(tmp_path / "saved")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()), logits(in_memory))


@pytest.mark.parametrize("kind", sorted(GQA_FAMILIES))
def test_top1_full_rank_expert_reproduces_the_finetuned_model(kind):
    """rank_of_expert above every width gives every projection its full rank: one expert is exact."""
    pre = decoder(kind)
    ft = noisy_copies(pre, 1, only=GQA_FAMILIES[kind])[0]
    model = upscale_causal_lm(pre, [ft], SmileSettings(rank_of_router=1, rank_of_expert=10**6), progress=False)
    assert {(m.k, min(m.in_features, m.out_features)) for m in model.modules() if isinstance(m, SmileLinear)} == {(16, 16), (32, 32)}
    torch.testing.assert_close(logits(model), logits(ft), rtol=1e-5, atol=1e-5)  # float32 SVD reconstruction


def test_configs_without_layer_ranks_load_as_before(tmp_path, mistral_family):
    """A checkpoint saved before per-projection ranks (no layer_ranks in its config) reloads unchanged."""
    pre, fts, _ = mistral_family
    model = upscale_causal_lm(pre, fts, SMILE, progress=False)
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config.pop("layer_ranks", None)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert reloaded.config.layer_ranks == {} and torch.equal(logits(reloaded), logits(model))
