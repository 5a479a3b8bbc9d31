"""Paper presets (``+preset=...``) compose to the papers' hub setups and settings. Composing never
instantiates anything, so these run offline; running a preset needs the hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import compose_fusion_bench, run_fusion_bench

PRESET_DIR = Path(__file__).resolve().parent.parent / "fusion_bench_pave" / "config" / "preset"

PAVE = "fusion_bench_pave.pave.PAVE"
SMILE = "fusion_bench_pave.smile.algorithm.SmileUpscalingAlgorithm"
SMILE_LM = "fusion_bench_pave.smile.algorithm.SmileMistralUpscalingAlgorithm"
CLIP_B32, CLIP_L14 = "openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14"
TA8, TA8_L14, GLUE = "clip-vit-classification_TA8", "clip-vit-classification_TA8_L14", "flan-t5_glue_text_generation"
EMR = "fusion_bench.method.emr_merging.EMRMerging"
CLIPS = {"b32": (CLIP_B32, TA8), "b16": ("openai/clip-vit-base-patch16", "clip-vit-classification_TA8_B16"),
         "l14": (CLIP_L14, TA8_L14)}
MERGERS = {"ta": {"merger._target_": "fusion_bench.method.TaskArithmeticAlgorithm", "merger.scaling_factor": 0.3},
           "ties": {"merger._target_": "fusion_bench.method.TiesMergingAlgorithm", "merger.scaling_factor": 0.3,
                    "merger.threshold": 20},
           "emr": {"merger._target_": EMR}}
# the official ViT protocol (preset/pave_clip/official.yaml); the *_train variants calibrate on a seeded
# sample of the train split instead of the first rows of the test split
OFFICIAL_VIT = {"rho": 63 / 64, "allocation": "per_model", "exclude_modules": ["*.self_attn.*"], "num_rows": 4096,
                "seed": 44, "calibration_split": "test", "sample_order": "first", "eps_check_pretrained": True}
TRAIN_VIT = {**OFFICIAL_VIT, "calibration_split": "train", "sample_order": "random"}
CLIP_PAVE_PRESETS = {
    f"pave_{method}_clip-vit-{arch}_ta8{suffix}": (PAVE, pretrained, 8, taskpool, {**protocol, **MERGERS[method]})
    for arch, (pretrained, taskpool) in CLIPS.items()
    for method in MERGERS
    for suffix, protocol in (("", OFFICIAL_VIT), ("_train", TRAIN_VIT))
}

# preset -> (method _target_, pretrained model, number of fine-tuned models, taskpool, method settings)
PRESETS = {
    **CLIP_PAVE_PRESETS,
    "smile_clip-vit-b32_ta8": (SMILE, CLIP_B32, 8, TA8, {"gate_k": 16, "k": 32, "top_k": 1}),
    "smile_clip-vit-l14_ta8": (SMILE, CLIP_L14, 8, TA8_L14, {"gate_k": 16, "k": 32, "top_k": 1}),
    "smile_flan-t5-base_glue": (SMILE, "google/flan-t5-base", 8, GLUE, {"gate_k": 4, "k": 16, "top_k": 1}),
    "smile_flan-t5-base_glue_lora16": (SMILE, "google/flan-t5-base", 8, GLUE, {"gate_k": 2, "k": 4, "top_k": 1}),
    "smile_mistral-7b_m0_123": (
        SMILE_LM, "mistralai/Mistral-7B-v0.1", 3, "lm_eval", {"rank_of_router": 8, "rank_of_expert": 512, "num_experts_per_tok": 1},
    ),
}


def _pretrained(models) -> str:
    entry = models["_pretrained_"]
    return entry if isinstance(entry, str) else entry.pretrained_model_name_or_path


# the official ViT protocol on FusionBench's open_clip pools (the task-vectors checkpoints the paper used):
# MLP only through purify_attention=false (open_clip's attention is nn.MultiheadAttention), heads = null
OPENCLIP = {"b32": "ViT-B-32", "b16": "ViT-B-16", "l14": "ViT-L-14"}
OPENCLIP_PRESETS = {
    f"pave_{method}_openclip-vit-{arch}_ta8": (model, {**OFFICIAL_VIT, "exclude_modules": None, "purify_attention": False,
                                                    **MERGERS[method]})
    for arch, model in OPENCLIP.items() for method in MERGERS
}

# presets over this package's offline zoos (composing must not resolve ${fbp_zoo:...}: that builds)
ZOO_PRESETS = {"pave_ties_zoo_minilm": (PAVE, "zoo_minilm")}
# presets of the streamed causal-LM methods, composed and run offline on the tiny Mistral in their own module
STREAMED_PRESETS = {"pave_ta_qwen2.5-7b_math_code": "test_causal_lm_pave_preset.py"}


TA, TIES = "fusion_bench.method.TaskArithmeticAlgorithm", "fusion_bench.method.TiesMergingAlgorithm"
GLUE_SUBSET = ["glue-sst2", "glue-qqp", "glue-mnli"]  # official GLUE EMR: ids [2, 5, 6]
# method part of a GLUE preset -> (merger _target_, PAVE settings): the official GLUE/README.md commands
# (calibration batches: 16 in pave_methods_glue.py, which runs TA and TIES; 64 in pave_merge_roberta_glue.py, EMR)
GLUE_METHODS = {
    "ta": (TA, {"rho": 31 / 32, "merger.scaling_factor": 0.3, "purify_tasks": None, "dare": None, "batch_size": 16}),
    "ties": (TIES, {"rho": 63 / 64, "merger.scaling_factor": 0.9, "merger.threshold": 20, "dare": None, "batch_size": 16}),
    "dare_ties": (TIES, {"rho": 63 / 64, "merger.scaling_factor": 0.5, "dare.sparsity_ratio": 0.5, "dare.rescale": True,
                         "batch_size": 16}),
    "emr": (EMR, {"rho": 7 / 8, "purify_tasks": GLUE_SUBSET, "batch_size": 64}),
    "emr_all_tasks": (EMR, {"rho": 7 / 8, "purify_tasks": None, "batch_size": 64}),
}
# the official GLUE calibration (config/pave_glue/official.yaml) every GLUE preset runs
GLUE_CALIBRATION = {"allocation": "per_model", "calibration_split": "train", "num_rows": 4096, "num_samples": 512,
                    "mask_padding": False, "calibration_padding": "longest", "max_length": 128,
                    "eps0": 0.1, "eps_tol": 0.05, "regularization": "doubling", "eps_check_pretrained": True}
# the official code's GLUE metrics (averaged_scores: the mean of accuracy and F1 for MRPC and QQP)
PAIR_F1 = {"glue-cola": ["matthews_correlation"], "glue-mrpc": ["accuracy", "f1"], "glue-qqp": ["accuracy", "f1"]}
# family -> (pretrained model, fine-tuned task names, task pool's metrics)
GLUE_FAMILIES = {
    "roberta-base_glue": ("FacebookAI/roberta-base", ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"],
                          {**PAIR_F1, "glue-stsb": ["pearson", "spearman"]}),
    "gpt-2_glue": ("gpt2", ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte"], PAIR_F1),
}
GLUE_PRESETS = {
    f"pave_{method.replace('_all_tasks', '')}_{family}{'_all_tasks' if method.endswith('_all_tasks') else ''}": (family, method)
    for family in GLUE_FAMILIES for method in GLUE_METHODS
}


def test_every_preset_file_is_covered():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(
        [*PRESETS, *ZOO_PRESETS, *GLUE_PRESETS, *STREAMED_PRESETS, *OPENCLIP_PRESETS])
    assert all((Path(__file__).parent / module).is_file() for module in STREAMED_PRESETS.values())


def _setting(node, dotted: str):
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("preset", sorted(GLUE_PRESETS))
def test_glue_preset_composes_to_the_official_procedure(preset):
    family, method = GLUE_PRESETS[preset]
    merger, settings = GLUE_METHODS[method]
    pretrained, tasks, metrics = GLUE_FAMILIES[family]
    cfg = compose_fusion_bench([f"+preset={preset}"])
    assert cfg.method._target_ == PAVE and cfg.method.merger._target_ == merger
    for key, value in {**GLUE_CALIBRATION, **settings}.items():
        actual = _setting(cfg.method, key)
        assert (actual == pytest.approx(value) if isinstance(value, float) else actual == value), key
    assert cfg.modelpool._target_ == "fusion_bench_pave.modelpool.SequenceClassificationModelPool"
    assert cfg.modelpool.pretrained_model_name_or_path == pretrained
    assert [m for m in cfg.modelpool.models if m != "_pretrained_"] == [f"glue-{t}" for t in tasks]
    assert list(cfg.modelpool.train_datasets) == [f"glue-{t}" for t in tasks]  # calibration: train splits
    assert cfg.taskpool._target_ == "fusion_bench_pave.taskpool.ClassificationHeadsTaskPool"
    assert list(cfg.taskpool.test_datasets) == [f"glue-{t}" for t in tasks]
    assert cfg.taskpool.metrics == metrics
    comment = " ".join(line.lstrip("#").strip() for line in (PRESET_DIR / f"{preset}.yaml").read_text().splitlines()
                       if line.startswith("#"))
    assert f"fusion_bench +preset={preset}" in comment  # the usage line names the preset itself
    figure = "84.28" if preset == "pave_emr_roberta-base_glue" else "not available to us"
    assert f"Paper's average: {figure}" in comment  # never a figure our notes do not give


def test_zoo_demo_preset_composes_without_building_the_zoo(tiny_cache):
    cfg = compose_fusion_bench(["+preset=pave_ties_zoo_minilm"])
    assert cfg.method._target_ == "fusion_bench_pave.pave.PAVE"
    assert cfg.method.merger._target_ == "fusion_bench.method.TiesMergingAlgorithm"
    assert cfg.method.merger.scaling_factor == 0.3 and cfg.method.max_length == 64
    assert cfg.method.rho == 63 / 64
    assert cfg.modelpool._target_ == "fusion_bench_pave.modelpool.SequenceClassificationModelPool"
    assert cfg.taskpool._target_ == "fusion_bench_pave.taskpool.SentenceEncoderTaskPool"
    # it ends with the comparison table; TIES alone is PAVE's merger with the same settings
    assert cfg._target_ == "fusion_bench_pave.comparison.ComparisonProgram" and cfg.print_function_call is False
    assert cfg.comparison.pretrained and cfg.comparison.individual
    assert cfg.comparison.baselines["TIES-Merging"] == cfg.method.merger
    assert not (tiny_cache / "zoo").exists()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_to_the_papers_setup(preset):
    target, pretrained, num_models, taskpool, settings = PRESETS[preset]
    cfg = compose_fusion_bench([f"+preset={preset}"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.taskpool.split("/")[-1] == taskpool
    assert cfg.method._target_ == target
    assert _pretrained(cfg.modelpool.models) == pretrained
    assert len([m for m in cfg.modelpool.models if m != "_pretrained_"]) == num_models
    for key, value in settings.items():
        node = cfg.method
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(value) if isinstance(value, float) else node == value, key
    if taskpool.startswith("clip"):  # zero-shot heads from the same CLIP as the pretrained model
        assert cfg.taskpool._target_ == "fusion_bench_pave.taskpool.CLIPVisionTaskPool"  # FusionBench's + dataset_templates
        assert cfg.taskpool.clip_model.pretrained_model_name_or_path == pretrained
        assert len(cfg.taskpool.test_datasets) == 8
    elif taskpool.startswith("flan"):
        assert cfg.taskpool.tokenizer == pretrained and len(cfg.taskpool.tasks) == 8
    else:
        assert list(cfg.taskpool.tasks) == ["gsm8k"]
    header = (PRESET_DIR / f"{preset}.yaml").read_text()
    assert f"fusion_bench +preset={preset}" in header  # the usage line names the preset itself


@pytest.mark.parametrize("preset", sorted(OPENCLIP_PRESETS))
def test_openclip_preset_composes_to_the_official_vit_protocol_on_fusion_benchs_pools(preset):
    model, settings = OPENCLIP_PRESETS[preset]
    cfg = compose_fusion_bench([f"+preset={preset}"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.modelpool == f"OpenCLIPVisionModelPool/{model}_TA8"
    assert cfg.hydra.runtime.choices.taskpool == f"OpenCLIPVisionModelTaskPool/{model}_TA8"
    assert cfg.method._target_ == PAVE
    for key, value in settings.items():
        actual = _setting(cfg.method, key)
        assert (actual == pytest.approx(value) if isinstance(value, float) else actual == value), key
    assert cfg.modelpool._target_ == "fusion_bench_pave.modelpool.OpenCLIPVisionModelPool"  # loads the pickles
    assert cfg.taskpool._target_ == "fusion_bench_pave.taskpool.OpenCLIPVisionTaskPool"  # + task modulation (EMR)
    models = cfg.modelpool.models
    pretrained = models["_pretrained_"]  # a path, or {model_name, pickle_path} (FusionBench's B/32 pool)
    assert (pretrained if isinstance(pretrained, str) else pretrained["pickle_path"]).endswith(f"{model}/zeroshot.pt")
    assert cfg.taskpool.model_name == model
    tasks = [m for m in models if m != "_pretrained_"]
    assert len(tasks) == 8 and list(cfg.modelpool.test_datasets) == tasks == list(cfg.taskpool.classification_heads)
    header = (PRESET_DIR / f"{preset}.yaml").read_text()
    assert f"fusion_bench +preset={preset}" in header and "table number and figure not available to us" in header


def test_presets_leave_other_settings_overridable():
    cfg = compose_fusion_bench(["+preset=smile_clip-vit-b32_ta8", "method.k=64"])
    assert cfg.method.k == 64 and cfg.method.gate_k == 16


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_use_our_atomic_saving_pools(preset):
    """Every hub preset swaps in our pool of the same kind (atomic save, refuses to overwrite;
    for Flan-T5 also the repaired load_tokenizer/save_model)."""
    target = compose_fusion_bench([f"+preset={preset}"]).modelpool._target_
    family = next(f for f in ("clip", "flan", "mistral") if f"_{f}" in preset)
    kind = {"clip": "CLIPVisionModelPool", "flan": "Seq2SeqLMPool", "mistral": "CausalLMPool"}[family]
    assert target == f"fusion_bench_pave.modelpool.{kind}"


@pytest.mark.slow
def test_cli_prints_the_composed_preset(tmp_path):
    proc = run_fusion_bench(["--cfg", "job", "+preset=pave_emr_clip-vit-b32_ta8"], cwd=tmp_path, timeout=300)
    job = yaml.safe_load(proc.stdout)
    assert job["method"]["_target_"] == "fusion_bench_pave.pave.PAVE"
    assert job["method"]["num_rows"] == 4096 and job["method"]["seed"] == 44
    assert job["modelpool"]["models"]["sun397"] == "tanganke/clip-vit-base-patch32_sun397"
