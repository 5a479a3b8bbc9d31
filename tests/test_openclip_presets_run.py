"""The PAVE presets on FusionBench's open_clip pools (the paper's own ViT checkpoints) run end to end
through the `fusion_bench` CLI offline: the preset's pool and task pool classes, method, merger and
protocol keys, with the task-vectors checkpoints swapped by overrides for tiny open_clip encoders
(tests/test_open_clip.py's), pickled whole as the task-vectors checkpoints are (which FusionBench 0.2.33's
pool cannot load on torch >= 2.6; ours can), with their own
classification heads, and the hub datasets for small saved ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import compose_fusion_bench, run_fusion_bench
from pave_helpers import image_dataset
from test_open_clip import tiny_encoder

from fusion_bench.models.open_clip import ClassificationHead
from reference.tiny_models import perturbed

PRESET = "pave_emr_openclip-vit-b16_ta8"  # its pool names each checkpoint by path, as the task-vectors code
TINY = 3  # tiny fine-tuned encoders, dealt round robin to the eight task names
NODES = ("modelpool.train_datasets", "modelpool.test_datasets", "taskpool.test_datasets")


def replace(node: str, value: str) -> list[str]:
    """Overrides replacing a config node (a dict in the preset) by `value`."""
    return [f"~{node}", f"+{node}={value}"]


def tiny_checkpoints(root: Path, tasks: list[str]) -> list[str]:
    """Pickled tiny encoders, heads and saved datasets under `root`; the overrides that point the
    composed preset's pools at them."""
    base = tiny_encoder()
    root.mkdir()
    encoders = {"_pretrained_": base, **{f"tiny{i}": perturbed(base, 100 + i) for i in range(TINY)}}
    for name, encoder in encoders.items():
        torch.save(encoder, root / f"{name}.pt")
    overrides = [f"modelpool.models._pretrained_='{root / '_pretrained_.pt'}'"]
    for i, task in enumerate(tasks):
        tiny = f"tiny{i % TINY}"
        overrides.append(f"modelpool.models.{task}='{root / f'{tiny}.pt'}'")
        head = ClassificationHead(normalize=True, weights=torch.randn(3, 16, generator=torch.Generator().manual_seed(i)))
        torch.save(head, root / f"head_{task}.pt")
        overrides.append(f"taskpool.classification_heads.{task}='{root / f'head_{task}.pt'}'")
        data = root / f"data_{task}"
        image_dataset(24, 300 + i).save_to_disk(str(data))
        for node in NODES:
            overrides += replace(f"{node}.{task}", f"{{_target_:datasets.load_from_disk,dataset_path:'{data}'}}")
    return overrides


def test_the_emr_preset_runs_offline_on_tiny_open_clip_encoders(tmp_path):
    cfg = compose_fusion_bench([f"+preset={PRESET}"])
    tasks = [task for task in cfg.modelpool.models if task != "_pretrained_"]
    assert len(tasks) == 8
    overrides = tiny_checkpoints(tmp_path / "checkpoints", tasks)
    overrides += ["taskpool.dataloader_kwargs.num_workers=0", "taskpool.dataloader_kwargs.pin_memory=false",
                  "method.num_samples=24", "method.num_rows=256",  # 17 token rows per 32x32 image at patch 8
                  "method.rho=0.75",  # at 63/64 the 32/64-wide layers keep every component
                  f"method.cache_dir={tmp_path / 'cache'}", f"path.log_dir={tmp_path / 'logs'}", "print_config=false"]
    run_fusion_bench([f"+preset={PRESET}", *overrides], cwd=tmp_path, timeout=900)

    scores = json.loads((tmp_path / "logs" / "program_report.json").read_text())["model"]
    assert [t for t in scores if t in tasks] == tasks  # every task scored with its own head
    assert all(0 <= scores[t]["accuracy"] <= 1 for t in tasks)
    pave = json.loads((tmp_path / "logs" / "pave_report.json").read_text())
    assert pave["calibration_split"] == "test" and pave["test_leakage"] is True and pave["eps_check_pretrained"] is True
    assert pave["allocation"] == "per_model" and pave["purified_tasks"] == tasks
    layers = {layer for ranks in pave["ranks"].values() for layer in ranks}
    assert layers == {f"model.visual.transformer.resblocks.{b}.mlp.{n}" for b in range(2) for n in ("c_fc", "c_proj")}
    assert "MultiheadAttention x2" in pave["unpurified"]  # attention keeps its plain task vectors
    assert any(ratio < 1 for ratio in pave["kept_ratio"].values())
    assert sorted(pave["covariance_cache_hits"]) == []  # first run: 8 fine-tuned + 8 pretrained collections


def test_our_pool_loads_the_pickled_checkpoints_that_fusion_benchs_refuses(tmp_path):
    import pickle

    import pytest
    from fusion_bench.modelpool import OpenCLIPVisionModelPool as FusionBenchPool

    from fusion_bench_pave.modelpool import OpenCLIPVisionModelPool

    encoder = perturbed(tiny_encoder(), 7)
    torch.save(encoder, tmp_path / "finetuned.pt")
    models = {"_pretrained_": str(tmp_path / "finetuned.pt")}
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True, and only RuntimeError falls back
        FusionBenchPool(dict(models)).load_model("_pretrained_")
    loaded = OpenCLIPVisionModelPool(dict(models)).load_model("_pretrained_").state_dict()
    assert loaded.keys() == encoder.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in encoder.state_dict().items())
