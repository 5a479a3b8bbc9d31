"""Every PAVE CLIP paper preset runs end to end through the `fusion_bench` CLI, offline: one
`fusion_bench -m +preset=a,b,...` process runs all of them, with the hub models and datasets of
FusionBench's eight-task pools swapped for the tiny CLIP zoo by overrides (each of the eight task
names gets one of the zoo's three fine-tuned models and its local dataset). Everything else is the
preset's own: method, merger, protocol keys, pool and task pool classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import compose_fusion_bench, run_fusion_bench
from test_presets import CLIP_PAVE_PRESETS

TINY_TASKS = ["tiny_color", "tiny_shape", "tiny_stripes"]
DATASET_NODES = ("modelpool.train_datasets", "modelpool.test_datasets", "taskpool.test_datasets")
# The zoo's splits hold 64 test / 128 train images of 17 token rows each (32x32 in 8x8 patches + class
# token), so fewer rows than the presets' 4096. At the presets' rho = 63/64 the zoo's 32-wide layers keep
# every component (each model's collapsed ratio rounds back to full rank), so rho is lowered to make the
# purification, and with it the calibration split, change the result.
TINY_PROTOCOL = ["++method.num_samples=32", "++method.num_rows=256", "++method.rho=0.75",
                 "++taskpool.dataloader_kwargs.num_workers=0", "++taskpool.dataloader_kwargs.pin_memory=false"]
CHANCE = 0.25  # the zoo's tasks have four classes each


def replica_overrides(zoo: Path, preset: str) -> list[str]:
    """Overrides that point `preset`'s hub models, processor and datasets at the tiny CLIP zoo."""
    cfg = compose_fusion_bench([f"+preset={preset}"])
    tasks = [name for name in cfg.modelpool.models if name != "_pretrained_"]
    tiny = {task: TINY_TASKS[i % len(TINY_TASKS)] for i, task in enumerate(tasks)}
    overrides = [f"modelpool.models._pretrained_={zoo / 'pretrained'}", f"modelpool.processor={zoo / 'pretrained'}",
                 f"taskpool.base_model={zoo / 'pretrained'}"]
    overrides += [f"modelpool.models.{task}={zoo / 'models' / tiny[task]}" for task in tasks]
    # class names and prompts of the tiny task behind each name (the zoo's text tower reads 64 characters)
    overrides += [f"taskpool.dataset_templates.{task}={{module:fusion_bench_pave.assets.tiny_tasks,"
                  f"classnames:{tiny[task]}_classnames,templates:templates}}" for task in tasks]
    for node in DATASET_NODES:
        group, key = node.split(".")
        for task, dataset in cfg[group][key].items():
            # datasets.load_dataset(<saved dataset dir>, split=...) reads the zoo's train/ and test/ splits
            field = "path" if "path" in dataset else "_args_"  # FusionBench's svhn passes ["svhn", "cropped_digits"]
            value = zoo / "data" / tiny[task]
            overrides.append(f"{node}.{task}.{field}={value if field == 'path' else [str(value)]}")
    # `++`: a multirun first composes the config without the swept presets, where these keys are absent
    return [f"++{override}" for override in overrides]


@pytest.mark.slow
def test_every_clip_pave_preset_merges_and_evaluates_offline(tmp_path, tiny_zoo, monkeypatch):
    zoo = tiny_zoo("clip")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))  # load_dataset's arrow copies
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny ops: threads only contend (6x slower on a busy machine)
    presets = sorted(CLIP_PAVE_PRESETS)
    overrides = replica_overrides(zoo, presets[0])
    # one command serves all: the presets differ in the pools only by their vit-* part
    assert all(replica_overrides(zoo, f"pave_ta_clip-vit-{arch}_ta8") == overrides for arch in ("b16", "l14"))
    sweep = tmp_path / "sweep"
    run_fusion_bench(
        ["-m", f"+preset={','.join(presets)}", *overrides, *TINY_PROTOCOL, f"path.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", "print_config=false"],
        cwd=tmp_path, timeout=900,
    )
    accuracies = {}
    for job, preset in enumerate(presets):
        assert yaml.safe_load((sweep / str(job) / "overrides.yaml").read_text())[0] == f"+preset={preset}"
        report = json.loads((sweep / str(job) / "program_report.json").read_text())["model"]
        pave = json.loads((sweep / str(job) / "pave_report.json").read_text())
        official = not preset.endswith("_train")
        assert pave["calibration_split"] == ("test" if official else "train")
        assert pave["test_leakage"] == official
        assert pave["allocation"] == "per_model" and len(pave["purified_tasks"]) == 8
        layers = {layer for ranks in pave["ranks"].values() for layer in ranks}
        assert layers and all(layer.endswith((".mlp.fc1", ".mlp.fc2")) for layer in layers), preset  # MLP only
        assert any(ratio < 1 for ratio in pave["kept_ratio"].values()), preset  # purified, not only a run
        accuracies[preset] = [report[task]["accuracy"] for task in pave["purified_tasks"]]
        assert sum(accuracies[preset]) / 8 > CHANCE, (preset, report)  # the merged model, scored on the zoo's tasks
    # the test and train splits calibrate differently, so each variant gives a merged model of its own
    assert all(accuracies[preset] != accuracies[f"{preset}_train"] for preset in presets if not preset.endswith("_train"))
