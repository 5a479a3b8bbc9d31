"""`benchmarks/reproduce.py --paper`: every GLUE preset of the PAVE paper and every SMILE preset runs end
to end through the ``fusion_bench`` CLI on the tiny offline replicas (reference/tiny_glue.py,
reference/paper_replicas.py; hub ids swapped by overrides, the presets' own settings unchanged), and the
table puts the paper's figure beside the measured one. The PAVE CLIP and LLM presets run the same way in
tests/test_presets_clip_run.py, the open_clip ones in tests/test_openclip_presets_run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, child_pythonpath, compose_fusion_bench
from test_presets import GLUE_METHODS, GLUE_PRESETS, GLUE_SUBSET

from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, CLIPVisionModel

from benchmarks import paper_tables
from benchmarks.paper_tables import NOT_AVAILABLE, PAPERS, REPLICAS, family_settings, reproduce_paper
from reference.tiny_glue import GLUE, GPT2_GLUE

RHO = {method: settings["rho"] for method, (_, settings) in GLUE_METHODS.items()}
TASKS = {"roberta-base_glue": [f"glue-{t}" for t in GLUE], "gpt-2_glue": [f"glue-{t}" for t in GPT2_GLUE]}
HEADS = ("classifier", "score", "pooler")


@pytest.mark.slow
def test_pave_table_runs_every_glue_preset_on_the_replicas(tmp_path):
    out = tmp_path / "table"
    presets = [row.preset for row in PAPERS["pave"] if row.preset in GLUE_PRESETS]
    assert sorted(presets) == sorted(GLUE_PRESETS)
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--paper", "pave", "--replica", "--out", str(out),
                           "--only", *presets], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["preset"] for r in rows] == presets and not [r for r in rows if "error" in r]

    collected: dict[tuple[str, int], set[str]] = {}  # (family, calibration batch size) -> tasks with statistics
    for row in rows:
        family, method = GLUE_PRESETS[row["preset"]]
        job = Path(row["job_dir"])
        assert f"+preset={row['preset']}" in yaml.safe_load((job / "overrides.yaml").read_text())
        report = json.loads((job / "program_report.json").read_text())
        scores = report["model"]  # PAVE returns {model, pave}: FusionBench files the evaluation under "model"
        tasks = TASKS[family]
        assert [k for k in scores if k.startswith("glue-")] == tasks
        assert scores["glue-cola"].keys() == {"matthews_correlation", "score"}
        mean = sum(scores[t]["score"] for t in tasks) / len(tasks)
        assert scores["average"]["score"] == pytest.approx(mean, rel=1e-12)
        assert row["measured"] == pytest.approx(100 * mean, rel=1e-12)

        pave = json.loads((job / "pave_report.json").read_text())
        purified = GLUE_SUBSET if method == "emr" else tasks
        assert pave["purified_tasks"] == purified and sorted(pave["ranks"]) == sorted(purified)
        assert pave["rho"] == pytest.approx(RHO[method])
        assert (pave["allocation"], pave["calibration_split"], pave["test_leakage"]) == ("per_model", "train", False)
        # allocation per_model: one rank per model on layers of equal width (every replica Linear: R = 32)
        ranks = {task: set(pave["ranks"][task].values()) for task in purified}
        assert set(pave["full_ranks"].values()) == {32} and all(len(r) == 1 for r in ranks.values())
        # no model below the floor R - round(1.5 * (R - round(rho * R))); at rho 63/64 that is R itself at R = 32
        # (round(31.5) = 32): the TIES presets keep every component there (at RoBERTa's width 768, 756)
        floor = 32 - round(1.5 * (32 - round(RHO[method] * 32)))
        kept = sorted(rank for r in ranks.values() for rank in r)
        assert floor <= kept[0] and kept[-1] <= 32 and (kept[0] < 32) == (floor < 32), (floor, ranks)
        assert not [layer for layer in pave["full_ranks"] if layer.split(".")[0] in HEADS]  # bodies only
        if family == "gpt-2_glue":  # every Conv1D of the GPT-2 body is purified
            assert {".".join(layer.split(".")[2:]) for layer in pave["full_ranks"]} == {  # h.<i>.<module>
                "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
        # statistics are collected once per task and calibration setting (the batch size changes the padding
        # rows: TA/TIES/DARE 16, EMR 64); later presets of the family read them from the cache
        done = collected.setdefault((family, GLUE_METHODS[method][1]["batch_size"]), set())
        hits = [t for t in purified if t in done]  # and the pretrained model's, on the same rows (eps_check_pretrained)
        assert pave["covariance_cache_hits"] == hits + [f"{t} (pretrained)" for t in hits]
        done.update(purified)

    table = (out / "results.md").read_text()
    for row in rows:
        paper = "84.28 (EMR-Merging alone 80.18; individual 85.55)" if row["preset"] == "pave_emr_roberta-base_glue" \
            else NOT_AVAILABLE
        assert row["paper"] == paper
        assert f"| `{row['preset']}` | {row['table']} | {row['row']} | {paper} | {row['measured']:.2f} |" in table
    assert "REPLICAS" in table


@pytest.mark.slow
def test_smile_table_runs_every_smile_preset_on_the_replicas(tmp_path, tiny_zoo):
    """CLIP on the tiny CLIP zoo, Flan-T5 (full and LoRA-16 pools) on the tiny T5 zoo with FusionBench's own
    Flan-T5 GLUE task pool, Mistral on the tiny Mistral zoo: each SMILE preset upscales and is evaluated."""
    zoos = {kind: tiny_zoo(kind) for kind in ("clip", "t5", "mistral")}  # built in the session's cache, which the child reads
    out = tmp_path / "table"
    env = {**os.environ, "PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--paper", "smile", "--replica", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["preset"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == [r.preset for r in PAPERS["smile"]] and not [r for r in rows.values() if "error" in r]
    tasks = {"clip": sorted(compose_fusion_bench(["+preset=smile_clip-vit-b32_ta8"]).taskpool.test_datasets),
             "flan": ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"], "mistral": ["sentiment", "topic", "weather"]}
    dense = {"clip": CLIPVisionModel.from_pretrained(zoos["clip"] / "pretrained"),
             "flan": AutoModelForSeq2SeqLM.from_pretrained(zoos["t5"] / "pretrained"),
             "mistral": AutoModelForCausalLM.from_pretrained(zoos["mistral"] / "pretrained")}
    growth = {}
    for preset, row in rows.items():
        family = next(f for f in tasks if f in preset)
        job = Path(row["job_dir"])
        assert yaml.safe_load((job / "overrides.yaml").read_text())[0] == f"+preset={preset}"
        report = json.loads((job / "program_report.json").read_text())
        assert sorted(k for k in report if k not in ("model_info", "average")) == sorted(tasks[family])
        metric = {"stsb": "spearman_rho"}  # FusionBench's Flan-T5 task pool: exact-match accuracy, STS-B's Spearman rho
        scored = [report[t]["accuracy"] for t in tasks[family] if metric.get(t) is None]
        assert row["metric"] == "accuracy" and row["measured"] == pytest.approx(100 * sum(scored) / len(scored), rel=1e-9)
        assert all(metric.get(t, "accuracy") in report[t] for t in tasks[family])
        # the upscaled model: experts and routers beside the dense model's weights
        growth[preset] = report["model_info"]["all_params"] - sum(p.numel() for p in dense[family].parameters())
        assert growth[preset] > 0, preset
        paper = next(r.figure for r in PAPERS["smile"] if r.preset == preset) or NOT_AVAILABLE
        assert f"| `{preset}` | {row['table']} | {row['row']} | {paper} | {row['measured']:.2f} |" in (out / "results.md").read_text()
    # the LoRA preset upscales only the q and v projections its adapters changed, at gate_k 2, k 4; the full
    # fine-tuning preset every Linear at gate_k 4, k 16
    assert growth["smile_flan-t5-base_glue_lora16"] < growth["smile_flan-t5-base_glue"] / 10
    assert sorted(p.name for p in (out / "replicas" / "flan-t5-base_glue_lora16" / "lora").iterdir()) == ["sentiment", "topic", "weather"]


def test_a_family_without_a_replica_is_listed_not_run_and_keeps_the_papers_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_tables, "REPLICAS", {})  # every family has one; a paper row added without one:
    summary = reproduce_paper("smile", tmp_path, replica=True)
    figures = {r["preset"]: r["paper"] for r in summary["rows"]}
    assert figures["smile_clip-vit-b32_ta8"] == "88.18 (1.61x parameters)"
    assert figures["smile_clip-vit-l14_ta8"] == "92.82 (1.47x parameters)"
    assert figures["smile_mistral-7b_m0_123"] == NOT_AVAILABLE  # SMILE.md gives M0;1, not M0;123
    assert all(r["error"].startswith("no offline replica of ") for r in summary["rows"])
    assert not (tmp_path / "runs").exists()
    table = (tmp_path / "results.md").read_text()
    assert "| `smile_clip-vit-b32_ta8` | CLIP ViT-B/32, 8 tasks | SMILE gate_k 16, k 32, top-1 | 88.18 (1.61x parameters) | " \
           "failed: no offline replica of clip-vit_ta8 |" in table


def test_every_family_has_a_replica():
    assert {row.family for rows in PAPERS.values() for row in rows} == set(REPLICAS)


def test_bad_arguments_fail_before_any_run(tmp_path):
    with pytest.raises(ValueError, match=r"not rows of the pave paper: \['pave_ta_roberta'\]"):
        reproduce_paper("pave", tmp_path, only=["pave_ta_roberta"])
    with pytest.raises(ValueError, match=r"--set names families \['roberta'\] that run no preset here"):
        reproduce_paper("pave", tmp_path, settings=["roberta:modelpool.finetuned_prefix=/x/"])
    (tmp_path / "runs" / "gpt-2_glue").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="gpt-2_glue'] hold an earlier run"):
        reproduce_paper("pave", tmp_path, replica=True, only=["pave_ta_gpt-2_glue"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing built, nothing written


def test_settings_apply_to_every_family_or_to_the_one_they_name():
    settings = ["seed=1", "roberta-base_glue:modelpool.finetuned_prefix=/data/rb/", "gpt-2_glue:method.rho=0.5"]
    assert family_settings(settings, "roberta-base_glue") == ["seed=1", "modelpool.finetuned_prefix=/data/rb/"]
    assert family_settings(settings, "gpt-2_glue") == ["seed=1", "method.rho=0.5"]
    assert family_settings(["method.note=a:b"], "gpt-2_glue") == ["method.note=a:b"]  # ':' in a value


@pytest.mark.slow
def test_a_preset_that_fails_is_a_table_row_naming_its_error(tmp_path):
    """Without --replica the presets load hub ids; offline (as the tests run) the job fails, and its row
    says where, instead of the table being lost."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    summary = reproduce_paper("pave", tmp_path, only=["pave_ta_gpt-2_glue"])
    [row] = summary["rows"]
    assert row["error"].startswith("no report: OSError: We couldn't connect to 'https://huggingface.co'")
    assert "runs/gpt-2_glue/0/cli.log" in row["error"] and "measured" not in row  # the job's own log
    assert (tmp_path / "runs" / "gpt-2_glue.log").read_text().startswith("$ ")
    assert f"| failed: {row['error']} |" in (tmp_path / "results.md").read_text()
