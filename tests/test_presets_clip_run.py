"""Every PAVE CLIP paper preset runs end to end through the `fusion_bench` CLI, offline, as rows of
`python -m benchmarks.reproduce --paper pave --replica`: one `fusion_bench -m +preset=a,b,...` process runs
all 18, with the hub models and datasets swapped for the tiny CLIP zoo by overrides
(reference/paper_replicas.py: each of the eight task names gets one of the zoo's three fine-tuned models
and its local dataset). Everything else is the preset's own: method, merger, protocol keys, pool and task
pool classes; the zoo's small splits make the replica calibrate on 32 images, 256 rows. (The PAVE paper's
LLM preset runs on its replica in tests/test_causal_lm_pave_preset.py, the SMILE CLIP presets in
tests/test_paper_tables.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import child_pythonpath, compose_fusion_bench
from test_presets import CLIP_PAVE_PRESETS

from benchmarks.paper_tables import CLIP, NOT_AVAILABLE, PAPERS
from reference.paper_replicas import CLIP_CALIBRATION, CLIP_TASKS, clip_overrides

# At the presets' rho = 63/64 the zoo's 32-wide layers keep every component (each model's collapsed ratio
# rounds back to full rank), so the test lowers rho for the CLIP family (--set <family>:...) to make the
# purification, and with it the calibration split, change the result.
TINY_RHO = f"{CLIP}:++method.rho=0.75"
CHANCE = 0.25  # the zoo's tasks have four classes each


def test_one_replica_serves_every_clip_preset(tiny_zoo):
    zoo = tiny_zoo("clip")
    pave = clip_overrides(zoo, compose_fusion_bench(["+preset=pave_ta_clip-vit-b32_ta8"]))
    # the presets differ in the pools only by their vit-* part: their replicas are the same overrides
    for preset in ("pave_emr_clip-vit-b16_ta8_train", "pave_ties_clip-vit-l14_ta8"):
        assert preset in CLIP_PAVE_PRESETS and clip_overrides(zoo, compose_fusion_bench([f"+preset={preset}"])) == pave
    smile = clip_overrides(zoo, compose_fusion_bench(["+preset=smile_clip-vit-l14_ta8"]))
    assert smile == [o for o in pave if o.removeprefix("++") not in CLIP_CALIBRATION]  # SMILE has no calibration
    assert f"++modelpool.models.sun397={zoo / 'models' / CLIP_TASKS[0]}" in pave
    assert f"++taskpool.test_datasets.svhn._args_={[str(zoo / 'data' / CLIP_TASKS[1])]}" in pave  # svhn, 5th: ["svhn", "cropped_digits"]


@pytest.mark.slow
def test_every_clip_pave_preset_merges_and_evaluates_offline(tmp_path, tiny_zoo):
    tiny_zoo("clip")  # built in the session's cache, which the child reads
    presets = [row.preset for row in PAPERS["pave"] if row.preset in CLIP_PAVE_PRESETS]
    assert sorted(presets) == sorted(CLIP_PAVE_PRESETS)
    env = {**os.environ, "PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1",  # tiny ops: threads only contend
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}  # load_dataset's arrow copies
    out = tmp_path / "table"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--paper", "pave", "--replica", "--out", str(out),
                           "--only", *presets, "--set", TINY_RHO], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["preset"] for r in rows] == presets and not [r for r in rows if "error" in r]
    assert [p.name for p in (out / "runs").iterdir() if p.is_dir()] == [CLIP]  # one process

    accuracies = {}
    for row in rows:
        job = Path(row["job_dir"])
        assert yaml.safe_load((job / "overrides.yaml").read_text())[0] == f"+preset={row['preset']}"
        report = json.loads((job / "program_report.json").read_text())
        assert row["paper"] == NOT_AVAILABLE
        scores, pave = report["model"], json.loads((job / "pave_report.json").read_text())
        official = not row["preset"].endswith("_train")
        assert pave["calibration_split"] == ("test" if official else "train")
        assert pave["test_leakage"] == official
        assert pave["allocation"] == "per_model" and len(pave["purified_tasks"]) == 8
        assert pave["rho"] == 0.75  # the test's --set reached its family's every preset
        layers = {layer for ranks in pave["ranks"].values() for layer in ranks}
        assert layers and all(layer.endswith((".mlp.fc1", ".mlp.fc2")) for layer in layers), row  # MLP only
        assert any(ratio < 1 for ratio in pave["kept_ratio"].values()), row  # purified, not only a run
        accuracies[row["preset"]] = [scores[task]["accuracy"] for task in pave["purified_tasks"]]
        mean = sum(accuracies[row["preset"]]) / 8
        assert mean > CHANCE, row  # the merged model, scored on the zoo's tasks
        assert row["measured"] == pytest.approx(100 * mean, rel=1e-9)
    # the test and train splits calibrate differently, so each variant gives a merged model of its own
    assert all(accuracies[p] != accuracies[f"{p}_train"] for p in accuracies if not p.endswith("_train"))
    table = (out / "results.md").read_text()
    assert all(f"| `{r['preset']}` | {r['table']} | {r['row']} | {NOT_AVAILABLE} | {r['measured']:.2f} |" in table for r in rows)
