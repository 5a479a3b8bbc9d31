"""Streaming merges of safetensors checkpoints == FusionBench's in-memory TA / TIES / DARE-TIES, bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.method.dare import DareTaskArithmetic, DareTiesMerging
from fusion_bench.modelpool import BaseModelPool
from transformers import AutoModelForCausalLM

from fusion_bench_pave.merging.checkpoint_merge import merge_causal_lm_checkpoints
from fusion_bench_pave.merging.stream import Dare, TaskArithmetic, Ties
from reference.tiny_models import decoder, noisy_copies, tokenizer

CANCELLING = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def family(request, tmp_path_factory):
    """A tiny Mistral and 3 noisy "fine-tuned" copies saved as sharded safetensors; in CANCELLING the
    first two task vectors cancel exactly, so TIES elects the whole model's majority sign there."""
    pre = decoder("mistral", num_hidden_layers=2, tie_word_embeddings=request.param)
    fts = noisy_copies(pre, 3, scale=0.02)
    with torch.no_grad():
        big = 1 + torch.rand(pre.get_parameter(CANCELLING).shape, generator=torch.Generator().manual_seed(5))
        for model, value in zip([pre, *fts], (0.0, big, -big, 0.0)):
            model.get_parameter(CANCELLING).copy_(value)
    root = tmp_path_factory.mktemp("family")
    pre.save_pretrained(root / "pre", max_shard_size="40KB")
    tokenizer().save_pretrained(root / "pre")
    for i, model in enumerate(fts):
        model.save_pretrained(root / f"ft{i}", max_shard_size="40KB")
    return pre, fts, root


def pool(pre, fts) -> BaseModelPool:
    # FusionBench's algorithms modify the models they load: give them copies
    return BaseModelPool({"_pretrained_": copy.deepcopy(pre), **{f"task{i}": copy.deepcopy(m) for i, m in enumerate(fts)}})


def streamed(root, out, method, **kwargs):
    path = merge_causal_lm_checkpoints(root / "pre", [root / f"ft{i}" for i in range(3)], root / out, method,
                                       progress=False, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path)


def assert_bit_equal(model, expected) -> None:
    # Bit-equal: per tensor the same elementwise ops run in the same order as on FusionBench's flattened
    # vectors, with the whole-vector quantities (thresholds, majority sign) found exactly.
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    unequal = [key for key in want if not torch.equal(got[key], want[key])]
    assert not unequal


def test_task_arithmetic(family):
    pre, fts, root = family
    assert_bit_equal(streamed(root, "ta", TaskArithmetic(0.3)), TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool(pre, fts)))


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties(family, merge_func):
    pre, fts, root = family
    expected = TiesMergingAlgorithm(scaling_factor=0.7, threshold=20, remove_keys=[], merge_func=merge_func).run(pool(pre, fts))
    merged = streamed(root, f"ties_{merge_func}", Ties(0.7, 20, merge_func))
    assert_bit_equal(merged, expected)
    # the exactly cancelling entries kept one side, by the whole model's majority sign
    change = merged.get_parameter(CANCELLING) - pre.get_parameter(CANCELLING)
    assert (change.abs() > 0.5).all() and change.sign().unique().numel() == 1


@pytest.mark.parametrize("only_on_linear_weights", [False, True])
def test_dare_ties_reproduces_fusion_benchs_random_masks(family, only_on_linear_weights):
    pre, fts, root = family
    torch.manual_seed(7)  # FusionBench's DARE draws from the global generator
    expected = DareTiesMerging(sparsity_ratio=0.5, only_on_linear_weights=only_on_linear_weights, rescale=True,
                               scaling_factor=0.6, threshold=0.3, remove_keys=[], merge_func="sum").run(pool(pre, fts))
    dare = Dare(0.5, rescale=True, only_on_linear_weights=only_on_linear_weights, seed=7)
    assert_bit_equal(streamed(root, f"dare_{only_on_linear_weights}", Ties(0.6, 0.3), dare=dare), expected)
    other_seed = streamed(root, f"dare_seed_{only_on_linear_weights}", Ties(0.6, 0.3), dare=Dare(0.5, True, only_on_linear_weights, seed=8))
    key = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(other_seed.get_parameter(key), expected.get_parameter(key))


def test_dare_task_arithmetic(family):
    pre, fts, root = family
    torch.manual_seed(3)
    expected = DareTaskArithmetic(scaling_factor=0.4, sparsity_ratio=0.6, only_on_linear_weights=True).run(pool(pre, fts))
    merged = streamed(root, "dare_ta", TaskArithmetic(0.4), dare=Dare(0.6, only_on_linear_weights=True, seed=3))
    assert_bit_equal(merged, expected)


def test_output_is_sharded_loadable_with_config_and_tokenizer(family):
    pre, fts, root = family
    out = merge_causal_lm_checkpoints(root / "pre", [root / f"ft{i}" for i in range(3)], root / "sharded",
                                      TaskArithmetic(1.0), max_shard_bytes=20_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").read_bytes() == (root / "pre" / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((root / "pre" / "config.json").read_text())
    assert ("lm_head.weight" in index["weight_map"]) != pre.config.tie_word_embeddings
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        expected = TaskArithmeticAlgorithm(scaling_factor=1.0).run(pool(pre, fts))(ids).logits
    assert torch.equal(logits, expected)


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(family):
    _, _, root = family
    paths = [root / f"ft{i}" for i in range(3)]
    out = merge_causal_lm_checkpoints(root / "pre", paths, root / "kept", TaskArithmetic(0.5), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        merge_causal_lm_checkpoints(root / "pre", paths, out, TaskArithmetic(0.9), progress=False)

    def failing(name, pretrained, vectors):
        if name.endswith("mlp.down_proj.weight"):
            raise RuntimeError("transform failed")
        return vectors

    with pytest.raises(RuntimeError, match="transform failed"):
        merge_causal_lm_checkpoints(root / "pre", paths, out, TaskArithmetic(0.9), transform=failing,
                                    overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not any(p.name.startswith(".kept.tmp-") for p in root.iterdir())


def test_transform_sees_the_same_task_vectors_in_every_pass_and_its_output_is_merged(family):
    pre, fts, root = family
    seen: dict[str, list[list[torch.Tensor]]] = {}

    def drop_queries(name, pretrained, vectors):  # stands in for purification of the q projections
        seen.setdefault(name, []).append([v.clone() for v in vectors])
        return [torch.zeros_like(v) for v in vectors] if "q_proj" in name else vectors

    dare = Dare(0.3, seed=1)
    merged = streamed(root, "transformed", Ties(0.5, 0.3), dare=dare, transform=drop_queries)
    assert {len(calls) for calls in seen.values()} == {4}  # float32: 2 threshold passes, votes, merge
    for calls in seen.values():
        assert all(torch.equal(a, b) for call in calls[1:] for a, b in zip(call, calls[0]))
    assert any((v == 0).float().mean() > 0.2 for v in seen["model.layers.0.mlp.up_proj.weight"][0])  # DARE came first
    for name, parameter in merged.named_parameters():
        if "q_proj" in name:
            assert torch.equal(parameter, pre.get_parameter(name))


def test_mismatched_checkpoints_fail_before_any_output(family, tmp_path):
    pre, _, root = family
    wider = decoder("mistral", num_hidden_layers=2, intermediate_size=72, tie_word_embeddings=pre.config.tie_word_embeddings)
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match=r"wider: model\.layers\.0\.mlp\.gate_proj\.weight is \[72, 32\] float32, the pretrained one \[64, 32\]"):
        merge_causal_lm_checkpoints(root / "pre", [root / "ft0", tmp_path / "wider"], tmp_path / "out",
                                    TaskArithmetic(0.5), progress=False)
    with pytest.raises(ValueError, match="TIES threshold 100 must keep a fraction in"):
        Ties(0.5, 100)
    assert not (tmp_path / "out").exists()
