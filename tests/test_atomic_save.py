"""Our model pools save merged models atomically and refuse an existing path unless overwrite=true,
both directly and through FusionBench's program (merged_model_save_path / merged_model_save_kwargs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, CLIPVisionModel

from fusion_bench import modelpool as fusion_bench_pools
from fusion_bench.utils import instantiate
from fusion_bench_pave.io.atomic import MANIFEST
from fusion_bench_pave.io.smile import load_smile_model, save_smile_model
from fusion_bench_pave.smile.algorithm import SmileMistralUpscalingAlgorithm, SmileUpscalingAlgorithm
from fusion_bench_pave.modelpool import (
    CausalLMPool,
    CLIPVisionModelPool,
    Seq2SeqLMPool,
    SequenceClassificationModelPool,
)

from conftest import REPO_ROOT, compose_fusion_bench, fusion_bench_cli


def tiny_pool(kind: str):
    return instantiate(compose_fusion_bench([f"modelpool=tiny_{kind}"]).modelpool)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_our_yamls_use_the_atomic_pools():
    for kind, cls in [("clip", CLIPVisionModelPool), ("t5", Seq2SeqLMPool), ("mistral", CausalLMPool)]:
        assert type(tiny_pool(kind)) is cls
    target = compose_fusion_bench(["modelpool=zoo_minilm"]).modelpool._target_
    assert target == "fusion_bench_pave.modelpool.SequenceClassificationModelPool"
    assert issubclass(SequenceClassificationModelPool, fusion_bench_pools.SequenceClassificationModelPool)


@pytest.mark.parametrize(
    "kind, loader",
    [("clip", CLIPVisionModel), ("t5", AutoModelForSeq2SeqLM), ("mistral", AutoModelForCausalLM)],
)
def test_save_reloads_refuses_an_existing_path_and_overwrites_on_request(tmp_path, kind, loader):
    pool = tiny_pool(kind)
    first, second = pool.load_model(pool.model_names[0]), pool.load_model(pool.model_names[1])
    out = tmp_path / "merged"
    pool.save_model(first, str(out))
    assert_same_weights(loader.from_pretrained(out), first)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging left behind
    with pytest.raises(FileExistsError, match=r"merged already exists; pass overwrite=true"):
        pool.save_model(second, str(out))
    assert_same_weights(loader.from_pretrained(out), first)
    pool.save_model(second, str(out), overwrite=True)
    assert_same_weights(loader.from_pretrained(out), second)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_a_failed_save_leaves_the_old_model(tmp_path, monkeypatch):
    pool = tiny_pool("clip")
    model = pool.load_model("tiny_color")
    out = tmp_path / "merged"
    pool.save_model(model, str(out))
    before = sorted(os.listdir(out))

    def broken(self, path, **kwargs):
        (Path(path) / "config.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(CLIPVisionModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pool.save_model(pool.load_model("tiny_shape"), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["merged"]
    monkeypatch.undo()
    assert_same_weights(CLIPVisionModel.from_pretrained(out), model)


def test_push_to_hub_is_refused(tmp_path):
    pool = tiny_pool("mistral")
    with pytest.raises(ValueError, match="push_to_hub is not supported by atomic saving"):
        pool.save_model(pool.load_model("sentiment"), str(tmp_path / "m"), push_to_hub=True)
    assert not (tmp_path / "m").exists()


def test_the_program_attaching_itself_checks_the_save_path(tmp_path):
    pool = tiny_pool("clip")
    (tmp_path / "logs" / "merged").mkdir(parents=True)
    program = SimpleNamespace(merged_model_save_path="{log_dir}/merged", log_dir=str(tmp_path / "logs"),
                              merged_model_save_kwargs=None)
    with pytest.raises(FileExistsError, match=r"logs/merged already exists; pass overwrite=true"):
        pool._program = program
    program.merged_model_save_kwargs = {"overwrite": True}
    pool._program = program
    assert pool._program is program
    (tmp_path / "logs" / "merged" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"logs/merged holds files fusion_bench_pave did not write there .*: notes\.txt;"):
        pool._program = program
    assert os.listdir(tmp_path / "logs" / "merged") == ["notes.txt"]
    pool._program = SimpleNamespace(merged_model_save_path=str(tmp_path / "new"), merged_model_save_kwargs=None)
    pool._program = SimpleNamespace(merged_model_save_path=None)


@pytest.mark.slow
def test_cli_refuses_an_existing_merged_model_path_before_merging(tmp_path):
    """The run would fail in PAVE's covariance step (more samples than the split has) if it got
    that far: the refusal comes first. (The overwrite=true path through the CLI runs in
    test_atomic_kill.py.)"""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    refused = fusion_bench_cli(["method=pave_ties", "method.num_samples=100000", "modelpool=tiny_clip", "~taskpool",
                   f"path.log_dir={tmp_path / 'logs'}", f"merged_model_save_path={out}", "print_config=false"], REPO_ROOT)
    assert refused.returncode != 0
    output = refused.stderr + refused.stdout
    assert "merged already exists; pass overwrite=true" in output
    assert "calibration samples" not in output and "PAVE covariance" not in output
    assert os.listdir(out) == ["precious.txt"]


def test_smile_models_are_saved_in_a_format_that_reloads_them(tmp_path):
    """from_pretrained would silently drop SMILE experts of a CLIP model: the pool writes SMILE's
    own format instead; SMILE causal LMs (own config class) keep the Hugging Face format."""
    pool = tiny_pool("clip")
    smile = SmileUpscalingAlgorithm(gate_k=2, k=4).run(pool)
    pool.save_model(smile, str(tmp_path / "smile"))
    assert sorted(os.listdir(tmp_path / "smile")) == [MANIFEST, "smile.json", "smile.safetensors"]
    assert_same_weights(load_smile_model(pool.load_pretrained_model(), tmp_path / "smile"), smile)
    with pytest.raises(OSError):
        CLIPVisionModel.from_pretrained(tmp_path / "smile")

    lm_pool = tiny_pool("mistral")
    smile_lm = SmileMistralUpscalingAlgorithm(rank_of_router=2, rank_of_expert=4).run(lm_pool)
    lm_pool.save_model(smile_lm, str(tmp_path / "smile_lm"))
    assert (tmp_path / "smile_lm" / "config.json").is_file()
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "smile_lm"), smile_lm)


def test_format_1_smile_checkpoints_still_load(tmp_path):
    pool = tiny_pool("clip")
    smile = SmileUpscalingAlgorithm(gate_k=2, k=4).run(pool)
    save_smile_model(smile, tmp_path / "v1")
    (tmp_path / "v1" / "smile.safetensors").rename(tmp_path / "v1" / "model.safetensors")
    manifest = json.loads((tmp_path / "v1" / "smile.json").read_text())
    (tmp_path / "v1" / "smile.json").write_text(json.dumps({**manifest, "format": "fusion_bench_pave.smile/1"}))
    assert_same_weights(load_smile_model(pool.load_pretrained_model(), tmp_path / "v1"), smile)
