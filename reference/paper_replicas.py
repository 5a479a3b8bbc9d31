"""Offline replicas of the papers' CLIP, open_clip, Flan-T5 and causal-LM setups, built from the tiny zoos
(``fusion_bench_pave.assets.tiny``; open_clip: tiny pickled encoders, ``build_openclip_replica``): each
function returns the CLI overrides that swap a composed preset's hub ids (models, processor, tokenizer,
datasets) for local ones. The presets' own settings (method, merger, protocol keys, pool and task pool
classes) stay as they are, except where a function's docstring names a setting the tiny data cannot hold.

Every override is ``++``: a multirun first composes the config without its swept presets, where these
keys are absent."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import DatasetDict

from reference.tiny_glue import GLUE, glue_split

CLIP_TASKS = ["tiny_color", "tiny_shape", "tiny_stripes"]
TEXT_TASKS = ["sentiment", "topic", "weather"]
CLIP_DATASET_NODES = ("modelpool.train_datasets", "modelpool.test_datasets", "taskpool.test_datasets")
# The CLIP zoo's splits hold 128 train / 64 test images of 17 token rows each (32x32 in 8x8 patches + class
# token): fewer than the presets' 128 calibration images and 4096 rows, so PAVE calibrates on 32 images and
# their first 256 rows (the same split, order and protocol as the preset's)
CLIP_CALIBRATION = ["method.num_samples=32", "method.num_rows=256"]
CLIP_LOADER = ["taskpool.dataloader_kwargs.num_workers=0", "taskpool.dataloader_kwargs.pin_memory=false"]
# open_clip replica: OPENCLIP_SOURCES tiny fine-tuned encoders, dealt round robin to the eight task names, each
# with its own data; test splits of 16 images (17 token rows each), so PAVE calibrates on 16 images, 256 rows
OPENCLIP_SOURCES, OPENCLIP_IMAGES = 3, {"train": 8, "test": 16}
OPENCLIP_CALIBRATION = ["method.num_samples=16", "method.num_rows=256"]
# test labels of source k: CLASS_COUNTS[k][c] images of class c. Each task's head favours one class (its bias
# outweighs any feature term), so a task's accuracy is that class's share of its source's test split: eight
# distinct numbers, changed by any head or dataset dealt to the wrong task
CLASS_COUNTS = ((1, 4, 11), (2, 5, 9), (3, 6, 7))
LORA_RANK = 16  # the preset's checkpoints are rank-16 LoRA adapters of q and v (tanganke/flan-t5-base_glue-*_lora-16)
FLAN_LENGTH = 64  # input tokens of the replica's prompts (the word-level tokenizer has no model_max_length)


def _round_robin(names, tiny: list[str]) -> dict[str, str]:
    """Each of ``names`` (the pool's task names, ``_pretrained_`` left out) -> one of the zoo's tasks."""
    tasks = [name for name in names if name != "_pretrained_"]
    return {task: tiny[i % len(tiny)] for i, task in enumerate(tasks)}


def clip_overrides(zoo: Path, cfg) -> list[str]:
    """Point a CLIP eight-task preset (composed ``cfg``) at the tiny CLIP zoo: each task name gets one of
    the zoo's three fine-tuned vision towers, its class names and its local dataset. A PAVE preset also
    calibrates on fewer images and rows (CLIP_CALIBRATION); the task pool reads in the main process."""
    tiny = _round_robin(cfg.modelpool.models, CLIP_TASKS)
    overrides = [f"modelpool.models._pretrained_={zoo / 'pretrained'}", f"modelpool.processor={zoo / 'pretrained'}",
                 f"taskpool.base_model={zoo / 'pretrained'}"]
    overrides += [f"modelpool.models.{task}={zoo / 'models' / tiny[task]}" for task in tiny]
    # class names and prompts of the tiny task behind each name (the zoo's text tower reads 64 characters)
    overrides += [f"taskpool.dataset_templates.{task}={{module:fusion_bench_pave.assets.tiny_tasks,"
                  f"classnames:{tiny[task]}_classnames,templates:templates}}" for task in tiny]
    overrides += _dataset_overrides(cfg, {task: zoo / "data" / source for task, source in tiny.items()})
    if "num_rows" in cfg.method:  # PAVE
        overrides += CLIP_CALIBRATION
    return [f"++{override}" for override in [*overrides, *CLIP_LOADER]]


def _dataset_overrides(cfg, data: dict[str, Path]) -> list[str]:
    """Each dataset node of the pools' FusionBench image datasets -> ``data[task]``, a directory of saved
    train/ and test/ splits that ``datasets.load_dataset(<dir>, split=...)`` reads."""
    overrides = []
    for node in CLIP_DATASET_NODES:
        group, key = node.split(".")
        for task, dataset in (cfg[group].get(key) or {}).items():
            field = "path" if "path" in dataset else "_args_"  # FusionBench's svhn passes ["svhn", "cropped_digits"]
            overrides.append(f"{node}.{task}.{field}={data[task] if field == 'path' else [str(data[task])]}")
    return overrides


def build_openclip_replica(root: Path, tasks: list[str]) -> dict[str, Path]:
    """Tiny open_clip checkpoints as the task-vectors code writes them (whole pickled ``ImageEncoder``s,
    ``ClassificationHead``s) and image data, under ``root`` (built once, reused when complete): the
    pretrained encoder, OPENCLIP_SOURCES perturbed copies with their datasets, one head per task of
    ``tasks`` (task i: source i mod 3, favoured class i // 3 mod 3). Returns task -> checkpoint, and
    ``head_<task>`` / ``data_<task>`` / ``_pretrained_`` entries."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    from fusion_bench.models.open_clip import ClassificationHead
    from reference.tiny_models import open_clip_encoder, perturbed

    paths = {"_pretrained_": root / "pretrained.pt"}
    for i, task in enumerate(tasks):
        source = f"tiny{i % OPENCLIP_SOURCES}"
        paths |= {task: root / "models" / f"{source}.pt", f"data_{task}": root / "data" / source,
                  f"head_{task}": root / "heads" / f"{task}.pt"}
    if (root / "complete").exists():
        return paths
    for folder in ("models", "data", "heads"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    base = open_clip_encoder()
    torch.save(base, paths["_pretrained_"])
    for k in range(OPENCLIP_SOURCES):
        torch.save(perturbed(base, 100 + k), root / "models" / f"tiny{k}.pt")
        rng = np.random.default_rng(300 + k)
        for split, n in OPENCLIP_IMAGES.items():
            labels = [c for c, count in enumerate(CLASS_COUNTS[k]) for _ in range(count)] if split == "test" else \
                [i % 3 for i in range(n)]
            images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in labels]
            Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(root / "data" / f"tiny{k}" / split))
    for i, task in enumerate(tasks):
        weights = torch.randn(3, 16, generator=torch.Generator().manual_seed(i))
        weights = 0.25 * weights / weights.norm(dim=1, keepdim=True)  # feature term within +-0.25 (unit features)
        torch.save(ClassificationHead(normalize=True, weights=weights, biases=torch.eye(3)[i // 3 % 3]),
                   paths[f"head_{task}"])
    (root / "complete").touch()
    return paths


def openclip_overrides(root: Path, cfg) -> list[str]:
    """Point an open_clip eight-task preset (composed ``cfg``, FusionBench's OpenCLIPVisionModelPool) at
    tiny checkpoints built under ``root`` (``build_openclip_replica``). Each model is named by its pickle's
    path, as the B/16 and L/14 pools name theirs: the B/32 pool's {model_name, pickle_path} entries would
    rebuild ``ImageEncoder("ViT-B-32")`` from the hub before loading the weights into it. A PAVE preset
    calibrates on OPENCLIP_CALIBRATION; the task pool reads in the main process."""
    tasks = [task for task in cfg.modelpool.models if task != "_pretrained_"]
    paths = build_openclip_replica(root, tasks)
    overrides = [f"modelpool.models.{task}={paths[task]}" for task in ["_pretrained_", *tasks]]
    overrides += [f"{pool}.classification_heads.{task}={paths[f'head_{task}']}" for pool in ("modelpool", "taskpool")
                  for task in tasks]
    overrides += _dataset_overrides(cfg, {task: paths[f"data_{task}"] for task in tasks})
    if "num_rows" in cfg.method:  # PAVE
        overrides += OPENCLIP_CALIBRATION
    return [f"++{override}" for override in [*overrides, *CLIP_LOADER]]


def lora_adapter(pretrained: Path, finetuned: Path, out: Path, rank: int = LORA_RANK) -> None:
    """A PEFT LoRA adapter of ``pretrained``'s q and v projections, saved in ``out``: the rank-``rank``
    truncated SVD of the fine-tuned model's q/v updates (lora_alpha = rank, so the scale is 1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(pretrained)
    tuned = AutoModelForSeq2SeqLM.from_pretrained(finetuned).state_dict()
    pre = {name: p.detach().clone() for name, p in base.state_dict().items()}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q", "v"], lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(base, config)
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        u, s, vh = torch.linalg.svd(tuned[key] - pre[key], full_matrices=False)
        with torch.no_grad():
            module.lora_B["default"].weight.copy_(u[:, :rank] * s[:rank])
            module.lora_A["default"].weight.copy_(vh[:rank])
    model.save_pretrained(out)


def flan_t5_glue_data(tokenizer_dir: Path, cache_dir: Path, tasks: list[str]) -> None:
    """GLUE-shaped data (reference/tiny_glue.py) run through FusionBench's own Flan-T5 GLUE prompts and
    preprocessors, saved where its ``load_glue_dataset`` reads its cache (``<cache_dir>/flan-t5/``)."""
    from transformers import AutoTokenizer

    from fusion_bench.tasks.flan_t5_text_generation.glue_preprocessors import glue_processors
    from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, model_max_length=FLAN_LENGTH)
    for i, task in enumerate(tasks):
        split = GLUE[task][2]
        data = DatasetDict({"train": glue_split(task, 16, 400 + i), split: glue_split(task, 32, 500 + i)})
        preprocessor = glue_processors[task](template=glue_prompt_templates[task], tokenizer=tokenizer,
                                             tokenizer_kwargs={"padding": "max_length", "truncation": True,
                                                               "return_tensors": "pt"})
        data = data.map(preprocessor, batched=True, remove_columns=data["train"].column_names)
        data.save_to_disk(str(cache_dir / "flan-t5" / f"_load_{task}_dataset_cached"))


def flan_t5_overrides(zoo: Path, out: Path, cfg) -> list[str]:
    """Point a Flan-T5 GLUE preset (fully fine-tuned or LoRA pool) at the tiny T5 zoo, evaluated by the
    preset's own FusionBench task pool on GLUE-shaped data written under ``out``. Full fine-tunes: each task
    name gets one of the zoo's fine-tuned models; LoRA: a rank-16 q/v adapter of one (``lora_adapter``)."""
    tiny = _round_robin(cfg.modelpool.models, TEXT_TASKS)
    pretrained = zoo / "pretrained"
    overrides = [f"modelpool.tokenizer.pretrained_model_name_or_path={pretrained}", f"taskpool.tokenizer={pretrained}",
                 f"taskpool.cache_dir={out}", "taskpool.num_workers=0"]
    if "base_model" in cfg.modelpool:  # LoRA pool: every model is base_model (+ adapter)
        overrides.append(f"modelpool.base_model={pretrained}")
    else:
        overrides.append(f"modelpool.models._pretrained_.pretrained_model_name_or_path={pretrained}")
    for task, source in tiny.items():
        if "peft_model_path" in cfg.modelpool.models[task]:
            adapter = out / "lora" / source
            if not adapter.exists():
                lora_adapter(pretrained, zoo / "models" / source, adapter)
            overrides.append(f"modelpool.models.{task}.peft_model_path={adapter}")
        else:
            overrides.append(f"modelpool.models.{task}.pretrained_model_name_or_path={zoo / 'models' / source}")
    flan_t5_glue_data(pretrained, out, [t.dataset.name for t in cfg.taskpool.tasks])
    return [f"++{override}" for override in overrides]


def causal_lm_overrides(zoo: Path, out: Path, cfg) -> list[str]:
    """Point a causal-LM preset (SMILE Mistral, streamed PAVE) at the tiny Mistral zoo: each model of the
    pool gets one of the zoo's fine-tuned models, each calibration dataset that model's train split; the
    lm-eval task pool (GSM8K, from the hub) becomes the zoo's label-word task pool (``taskpool=tiny_mistral``,
    metric ``accuracy``); a streamed merge is written to ``out/merged``."""
    tiny = _round_robin(cfg.modelpool.models, TEXT_TASKS)
    overrides = [f"++modelpool.models._pretrained_={zoo / 'pretrained'}", f"++modelpool.tokenizer={zoo / 'pretrained'}"]
    overrides += [f"++modelpool.models.{task}={zoo / 'models' / source}" for task, source in tiny.items()]
    overrides += [f"++method.calibration_datasets.{task}={zoo / 'data' / tiny[task] / 'train'}"
                  for task in cfg.method.get("calibration_datasets") or {}]
    if "output_path" in cfg.method:
        overrides.append(f"++method.output_path={out / 'merged'}")
    return [*overrides, "taskpool=tiny_mistral", "~taskpool.tasks"]
