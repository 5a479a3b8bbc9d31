"""The nine PAVE presets on FusionBench's open_clip pools (the paper's own ViT checkpoints) run end to end
through the `fusion_bench` CLI offline, as rows of `python -m benchmarks.reproduce --paper pave --replica`:
one `fusion_bench -m +preset=a,b,...` process runs all nine, with the task-vectors checkpoints swapped by
overrides for tiny open_clip encoders pickled whole as those checkpoints are (which FusionBench 0.2.33's
pool cannot load on torch >= 2.6; ours can), their own classification heads and small saved datasets
(reference/paper_replicas.py). Everything else is the preset's own: method, merger, protocol keys, pool
and task pool classes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from conftest import child_pythonpath, compose_fusion_bench
from datasets import load_from_disk
from test_presets import MERGERS, OPENCLIP_PRESETS

import fusion_bench_pave.plugin  # noqa: F401  (compat repair: typing.override on Python 3.11)
from benchmarks.paper_tables import NOT_AVAILABLE, OPENCLIP, PAPERS, reproduce_paper
from fusion_bench.modelpool import OpenCLIPVisionModelPool as FusionBenchPool
from fusion_bench_pave.modelpool import OpenCLIPVisionModelPool
from reference.paper_replicas import build_openclip_replica, openclip_overrides
from reference.tiny_models import open_clip_encoder, perturbed

# at the presets' rho = 63/64 the tiny 32/64-wide layers keep every component, so the test lowers rho
TINY_RHO = f"{OPENCLIP}:++method.rho=0.75"
MLP = {f"model.visual.transformer.resblocks.{b}.mlp.{n}" for b in range(2) for n in ("c_fc", "c_proj")}


def test_one_replica_serves_every_openclip_preset_and_names_each_checkpoint_by_path(tmp_path):
    # the presets' pools differ by architecture only (the merger is the method's): one override list serves all
    cfgs = {arch: compose_fusion_bench([f"+preset=pave_emr_openclip-vit-{arch}_ta8"]) for arch in ("b32", "b16", "l14")}
    overrides = openclip_overrides(tmp_path, cfgs["b16"])
    assert all(openclip_overrides(tmp_path, cfg) == overrides for cfg in cfgs.values())
    # the B/32 pool's {model_name, pickle_path} entries would rebuild ImageEncoder("ViT-B-32") from the hub;
    # the replica names each pickle by its path, as the B/16 and L/14 pools do
    assert cfgs["b32"].modelpool.models.sun397.model_name == "ViT-B-32"
    models = compose_fusion_bench(["+preset=pave_emr_openclip-vit-b32_ta8", *overrides]).modelpool.models
    assert models.sun397 == models.eurosat == str(tmp_path / "models" / "tiny0.pt")
    assert all(isinstance(path, str) and Path(path).is_file() for path in models.values())


@pytest.mark.slow
def test_every_openclip_preset_merges_and_evaluates_offline(tmp_path, monkeypatch):
    for name, value in {"PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}.items():
        monkeypatch.setenv(name, value)  # the fusion_bench child's environment
    presets = [row.preset for row in PAPERS["pave"] if row.preset in OPENCLIP_PRESETS]
    assert sorted(presets) == sorted(OPENCLIP_PRESETS)
    out = tmp_path / "table"
    rows = reproduce_paper("pave", out, replica=True, only=presets, settings=[TINY_RHO])["rows"]
    assert [r["preset"] for r in rows] == presets and not [r for r in rows if "error" in r], rows
    assert [p.name for p in (out / "runs").iterdir() if p.is_dir()] == [OPENCLIP]  # one process

    tasks = [task for task in compose_fusion_bench([f"+preset={presets[0]}"]).modelpool.models if task != "_pretrained_"]
    paths = build_openclip_replica(out / "replicas" / OPENCLIP, tasks)  # built by the run: read back
    # each task's head favours one class (its bias outweighs the features): the task's accuracy is that
    # class's share of its own test split, eight distinct numbers
    expected = {}
    for task in tasks:
        favoured = int(torch.load(paths[f"head_{task}"], weights_only=False).bias.argmax())
        labels = load_from_disk(str(paths[f"data_{task}"] / "test"))["label"]
        expected[task] = sum(label == favoured for label in labels) / len(labels)
    assert len(set(expected.values())) == 8
    size = sum(p.numel() for p in torch.load(paths["_pretrained_"], weights_only=False).parameters())

    for i, row in enumerate(rows):
        job = Path(row["job_dir"])
        assert yaml.safe_load((job / "overrides.yaml").read_text())[0] == f"+preset={row['preset']}"
        method = row["preset"].split("_")[1]
        merger = yaml.safe_load((job / "config.yaml").read_text())["method"]["merger"]
        assert merger["_target_"] == MERGERS[method]["merger._target_"]
        scores = json.loads((job / "program_report.json").read_text())["model"]
        assert [t for t in scores if t in tasks] == tasks
        assert {t: scores[t]["accuracy"] for t in tasks} == pytest.approx(expected, abs=1e-6)  # each with its own head
        assert row["paper"] == NOT_AVAILABLE and row["measured"] == pytest.approx(100 * sum(expected.values()) / 8)
        # EMR's task-modulated model: backbone, unified task vector, eight masks and eight scales
        assert scores["model_info"]["all_params"] == (10 * size + 8 if method == "emr" else size)

        pave = json.loads((job / "pave_report.json").read_text())
        assert pave["calibration_split"] == "test" and pave["test_leakage"] is True and pave["eps_check_pretrained"] is True
        assert pave["allocation"] == "per_model" and pave["purified_tasks"] == tasks
        assert pave["rho"] == 0.75  # the test's --set reached its family's every preset
        assert {layer for ranks in pave["ranks"].values() for layer in ranks} == MLP  # MLP only
        assert "MultiheadAttention x2" in pave["unpurified"]  # attention keeps its plain task vectors
        assert any(ratio < 1 for ratio in pave["kept_ratio"].values()), row  # purified, not only a run
        # the statistics of the family's first preset serve the others (the same calibration)
        assert pave["covariance_cache_hits"] == ([] if i == 0 else tasks + [f"{t} (pretrained)" for t in tasks])
    table = (out / "results.md").read_text()
    assert all(f"| `{r['preset']}` | {r['table']} | {r['row']} | {NOT_AVAILABLE} | {r['measured']:.2f} |" in table for r in rows)


def test_our_pool_loads_the_pickled_checkpoints_that_fusion_benchs_refuses(tmp_path):
    encoder = perturbed(open_clip_encoder(), 7)
    torch.save(encoder, tmp_path / "finetuned.pt")
    models = {"_pretrained_": str(tmp_path / "finetuned.pt")}
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True, and only RuntimeError falls back
        FusionBenchPool(dict(models)).load_model("_pretrained_")
    loaded = OpenCLIPVisionModelPool(dict(models)).load_model("_pretrained_").state_dict()
    assert loaded.keys() == encoder.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in encoder.state_dict().items())
