"""What a careless user gets: one table of bad inputs to every entry point (PAVE, SMILE, SMILE causal
LM, the model pools and the CLI's config composition) and the exact error each must raise.

Every row runs the real entry point on tiny models; the regexes match our messages, so a row fails
if its check is removed (the input would then pass silently or die with a different, raw error).
"""

from __future__ import annotations

import json
import shutil
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from datasets import Dataset
from hydra.errors import MissingConfigException
from torch import nn

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils import instantiate
from fusion_bench_pave.io.smile import save_smile_model
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.rank_allocation import allocate_ranks
from fusion_bench_pave.smile import SmileLinear
from fusion_bench_pave.smile.algorithm import SmileMistralUpscalingAlgorithm, SmileUpscalingAlgorithm
from fusion_bench_pave.smile.causal_lm.upscale import SmileSettings, upscale_causal_lm_checkpoint
from fusion_bench_pave.summarize import summarize
from fusion_bench_pave.taskpool import LabelWordsTaskPool

from conftest import compose_fusion_bench, fusion_bench_cli
from pave_helpers import T5, make_pool
from reference.tiny_models import clip_vision, decoder, noisy_copies, t5

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}


# ------------------------------------------------------------------ PAVE inputs
def pave(**kwargs) -> PAVE:
    return PAVE(**{"merger": TA, "rho": 0.9, "num_samples": 12, "batch_size": 4, "eps0": 0.01, **kwargs})


def pave_pool(edit: Callable | None = None) -> BaseModelPool:
    """The tiny in-memory CLIP pool (task0..task2), optionally edited in place."""
    pool = make_pool("clip")
    if edit is not None:
        with torch.no_grad():
            edit(pool)
    return pool


def submodule(model: nn.Module, suffix: str) -> nn.Module:
    """The first module whose name ends with ``suffix`` (CLIP nests differently across transformers versions)."""
    return next(m for n, m in model.named_modules() if n.endswith(suffix))


def fc1(model: nn.Module) -> nn.Linear:
    return submodule(model, "layers.0.mlp.fc1")


def set_fc1_weight(pool, shape):
    fc1(pool.load_model("task2")).weight = nn.Parameter(torch.zeros(shape))


def nan_pixels(pool):
    """A processor whose pixel values are NaN: the activations, not the weights, are bad."""
    processor = pool._preprocessor_object

    def broken(*args, **kwargs):
        out = processor(*args, **kwargs)
        out["pixel_values"] = torch.full_like(out["pixel_values"], float("nan"))
        return out

    pool._preprocessor_object = broken


def overflowing_layer_norm(pool):
    """Finite weights whose activations overflow: the covariance of the next Linear is inf."""
    submodule(pool.load_model("task0"), "layers.0.layer_norm2").weight.fill_(1e30)


def pave_row(edit=None, **kwargs) -> Callable:
    return lambda tmp_path: pave(**kwargs).run(pave_pool(edit))


# --------------------------------------------------------------- SMILE inputs
def clip_family(n: int = 2, edit: Callable | None = None) -> dict[str, nn.Module]:
    base = clip_vision()
    models = {"_pretrained_": base, **{f"m{i}": m for i, m in enumerate(noisy_copies(base, n))}}
    if edit is not None:
        with torch.no_grad():
            edit(models)
    return models


def smile_row(models: Callable[[], dict], **kwargs) -> Callable:
    settings = {"gate_k": 2, "k": 4, **kwargs}
    return lambda tmp_path: SmileUpscalingAlgorithm(**settings).run(BaseModelPool(models()))


def smile_fc1(models, name="m1") -> nn.Linear:
    return models[name].encoder.layers[0].mlp.fc1


def smile_nan(models):
    smile_fc1(models).weight[0, 0] = float("nan")


def smile_inf_pretrained(models):
    smile_fc1(models, "_pretrained_").bias[3] = float("inf")


def smile_shape(models):
    models["m0"].encoder.layers[0].mlp.fc1 = nn.Linear(32, 48)


def mistral_family(n: int = 2) -> dict[str, nn.Module]:
    base = decoder("mistral")
    return {"_pretrained_": base, **{f"m{i}": m for i, m in enumerate(noisy_copies(base, n))}}


def mistral_row(**kwargs) -> Callable:
    settings = {"rank_of_router": 2, "rank_of_expert": 4, **kwargs}
    return lambda tmp_path: SmileMistralUpscalingAlgorithm(**settings).run(BaseModelPool(mistral_family()))


def existing_smile_output(tmp_path):
    (tmp_path / "smile").mkdir()
    save_smile_model(clip_vision(), tmp_path / "smile")


def not_a_smile_checkpoint(tmp_path):
    (tmp_path / "smile").mkdir()
    SmileUpscalingAlgorithm(gate_k=2, k=4, model_path=str(tmp_path / "smile")).run(BaseModelPool(clip_family()))


def corrupt_smile_checkpoint(tmp_path):
    out = tmp_path / "smile"
    SmileUpscalingAlgorithm(gate_k=2, k=4, model_path=str(out)).run(BaseModelPool(clip_family()))
    truncate(out / "smile.safetensors")
    SmileUpscalingAlgorithm(gate_k=2, k=4, model_path=str(out)).run(BaseModelPool(clip_family()))


def corrupt_streaming_checkpoint(tmp_path):
    models = mistral_family()
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    truncate(tmp_path / "m1" / "model.safetensors")
    upscale_causal_lm_checkpoint(tmp_path / "_pretrained_", [tmp_path / "m0", tmp_path / "m1"], tmp_path / "out",
                                 SmileSettings(num_experts_per_tok=1, rank_of_router=2, rank_of_expert=4), progress=False)


# ------------------------------------------------------------ pools and CLI
def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def zoo_pool(kind: str, overrides: list[str] = ()) -> BaseModelPool:
    return instantiate(compose_fusion_bench([f"modelpool=tiny_{kind}", *overrides]).modelpool)


def pave_on_missing_model(tmp_path):
    pave().run(zoo_pool("clip", [f"modelpool.models.tiny_shape={tmp_path / 'no_such_model'}"]))


def smile_on_missing_t5(tmp_path):
    path = tmp_path / "no_such_t5"
    pool = zoo_pool("t5", [f"modelpool.models.topic.pretrained_model_name_or_path={path}"])
    SmileUpscalingAlgorithm(gate_k=2, k=4).run(pool)


def pave_on_corrupt_safetensors(tmp_path):
    source = Path(zoo_pool("clip").get_model_path("tiny_color"))
    shutil.copytree(source, tmp_path / "tiny_color")
    truncate(tmp_path / "tiny_color" / "model.safetensors")
    pave().run(zoo_pool("clip", [f"modelpool.models.tiny_color={tmp_path / 'tiny_color'}"]))


def merged_model_path_exists(tmp_path):
    (tmp_path / "merged").mkdir()
    pool = zoo_pool("clip")
    pool._program = SimpleNamespace(merged_model_save_path=str(tmp_path / "merged"), merged_model_save_kwargs=None)


def save_over_existing_model(tmp_path):
    (tmp_path / "merged").mkdir()
    pool = zoo_pool("mistral")
    pool.save_model(pool.load_model("topic"), str(tmp_path / "merged"))


def evaluate_on_an_empty_test_split(tmp_path):
    """(In memory: datasets' own load_from_disk cannot even reload an empty split.)"""
    taskpool = instantiate(compose_fusion_bench(["taskpool=tiny_t5"]).taskpool)
    taskpool.test_datasets = {"topic": Dataset.from_dict({"text": [], "label": []})}
    taskpool.evaluate(zoo_pool("t5").load_pretrained_model())


# ---------------------------------------- outputs: overwrite and sweep summaries (issue 14)
def overwrite_foreign_files(tmp_path, via_program: bool):
    """A saved model directory that someone added a file to, then overwrite=true."""
    pool = zoo_pool("mistral")
    pool.save_model(pool.load_model("topic"), str(tmp_path / "merged"))
    (tmp_path / "merged" / "eval_notes.txt").write_text("mine")
    if via_program:
        pool._program = SimpleNamespace(merged_model_save_path=str(tmp_path / "merged"),
                                        merged_model_save_kwargs={"overwrite": True})
    else:
        pool.save_model(pool.load_model("topic"), str(tmp_path / "merged"), overwrite=True)


def sweep_job(sweep: Path, name: str, report: dict | None) -> None:
    (sweep / name).mkdir(parents=True)
    (sweep / name / "overrides.yaml").write_text(f"- method.rho=0.{name}\n")
    if report is not None:
        (sweep / name / "program_report.json").write_text(json.dumps(report))


def summarize_by_typo(tmp_path):
    sweep_job(tmp_path, "0", {"a": {"accuracy": 0.5}, "average": {"accuracy": 0.5}})
    summarize(tmp_path, metric="a.acc")


def summarize_crashed(tmp_path):
    sweep_job(tmp_path, "0", None)
    (tmp_path / "0" / "cli.log").write_text("Traceback (most recent call last):\nRuntimeError: out of memory\n")
    summarize(tmp_path)
# ------------------------------------- checks before any work (issue 14: keys, types, pools, merger)
def untouched(pool: BaseModelPool, pretrained: bool = False) -> BaseModelPool:
    """``pool`` failing the row if a fine-tuned model (or, unless ``pretrained``, any model) is
    loaded: the row's error must come before that work."""
    load = pool.load_model

    def guarded(name, *args, **kwargs):
        if pretrained and name == "_pretrained_":
            return load(name, *args, **kwargs)
        raise AssertionError(f"model '{name}' loaded before the check")

    pool.load_model = guarded
    return pool


def pave_first(pretrained: bool = False, kind: str = "clip", program=None, **kwargs) -> Callable:
    """A PAVE row on a pool that must not be loaded (beyond the pretrained model) before the error."""

    def run(tmp_path):
        algorithm = pave(**kwargs)
        algorithm._program = program() if program else None
        algorithm.run(untouched(make_pool(kind), pretrained))

    return run


def program_with_taskpool(kind: str) -> Callable:
    """What FusionBench's program offers the algorithm: the instantiated task pool of the tiny zoo."""
    return lambda: SimpleNamespace(taskpool=instantiate(compose_fusion_bench([f"taskpool=tiny_{kind}"]).taskpool))


def smile_with_taskpool(algorithm, models: Callable, kind: str) -> Callable:
    def run(tmp_path):
        algorithm._program = program_with_taskpool(kind)()
        algorithm.run(BaseModelPool(models()))

    return run


def no_linear_pool(tmp_path):
    base = nn.Sequential(nn.Conv1d(4, 4, 1))
    pave().run({"_pretrained_": base, "m0": deepcopy(base)})


ROWS = [
    # PAVE: pool contents
    ("pave: fine-tuned model of another architecture", pave_row(lambda p: p._models.__setitem__("task1", t5(**T5))),
     ValueError, r"task 'task1': architecture differs from the pretrained model"),
    ("pave: fine-tuned weight of another shape", pave_row(lambda p: set_fc1_weight(p, (16, 32))),
     ValueError, r"task 'task2': parameter '.*fc1\.weight' has shape \(16, 32\), pretrained has \(64, 32\)"),
    ("pave: pool without fine-tuned models", lambda tmp_path: pave().run({"_pretrained_": clip_vision()}),
     ValueError, r"the pool has no fine-tuned models besides _pretrained_"),
    ("pave: task without calibration data", pave_row(lambda p: p._train_datasets.pop("task1")),
     ValueError, r"task 'task1' has no calibration data: add `train_datasets\.task1`"),
    ("pave: empty calibration dataset", pave_row(lambda p: p._train_datasets.__setitem__("task0", p._train_datasets["task0"].select([]))),
     ValueError, r"task 'task0': its calibration dataset is empty \(0 rows\)"),
    ("pave: more samples than the dataset has", pave_row(num_samples=50),
     ValueError, r"task 'task0': asked for 50 calibration samples but its calibration dataset has only 24 rows"),
    ("pave: NaN in fine-tuned weights", pave_row(lambda p: fc1(p.load_model("task1")).weight.__setitem__((0, 0), float("nan"))),
     ValueError, r"task 'task1': parameter '.*fc1\.weight' has non-finite values"),
    ("pave: inf in pretrained weights", pave_row(lambda p: fc1(p.load_pretrained_model()).bias.__setitem__(0, float("inf"))),
     ValueError, r"pretrained model: parameter '.*fc1\.bias' has non-finite values"),
    ("pave: NaN activations", pave_row(nan_pixels),
     ValueError, r"task 'task0': non-finite input covariance at Linear"),
    ("pave: overflowing (inf) activations", pave_row(overflowing_layer_norm),
     ValueError, r"task 'task0': non-finite input covariance at Linear 'encoder\.layers\.\d\.[\w.]+'"),
    # PAVE: hyperparameters
    ("pave: rho = 0", pave_row(rho=0.0), ValueError, r"rho must be in \(0, 1\], got 0\.0"),
    ("pave: rho < 0", pave_row(rho=-0.5), ValueError, r"rho must be in \(0, 1\], got -0\.5"),
    ("pave: rho > 1", pave_row(rho=1.5), ValueError, r"rho must be in \(0, 1\], got 1\.5"),
    ("rank allocator: rho too small for one component per model",
     lambda tmp_path: allocate_ranks({"fc": [[1.0, 0.5, 0.1]] * 2}, 0.1),
     ValueError, r"rho=0\.1 leaves fewer than one component per model \(R=3, T=2, budget 0\)"),
    ("pave: unknown merger class", pave_row(merger={"_target_": "fusion_bench.method.NoSuchMerger"}),
     ValueError, r"merger\._target_='fusion_bench\.method\.NoSuchMerger' cannot be imported"),
    ("pave: merger without _target_", pave_row(merger={"scaling_factor": 0.3}),
     ValueError, r"merger needs a `_target_`"),
    ("pave: merger that is not an algorithm", pave_row(merger={"_target_": "torch.nn.Linear"}),
     ValueError, r"merger\._target_='torch\.nn\.Linear' has no run\(modelpool\) method"),
    ("pave: merger instantiated by a recursive instantiate", pave_row(merger=instantiate(TA)),
     ValueError, r"merger must be a config with `_target_`, got an instantiated TaskArithmeticAlgorithm"),
    ("pave: unknown allocation", pave_row(allocation="greedy"),
     ValueError, r"allocation must be one of per_layer, per_model, uniform; got 'greedy'"),
    ("pave: unknown regularization", pave_row(regularization="ridge"),
     ValueError, r"regularization must be one of doubling, relative; got 'ridge'"),
    ("pave: unknown purify target", pave_row(purify_target="pretrained"),
     ValueError, r"purify_target must be one of finetuned, task_vector; got 'pretrained'"),
    ("pave: unknown accumulate dtype", pave_row(accumulate_dtype="float16"),
     ValueError, r"accumulate_dtype must be one of float32, float64; got 'float16'"),
    ("pave: unknown covariance offload", pave_row(covariance_offload="swap"),
     ValueError, r"covariance_offload must be one of auto, memory, disk; got 'swap'"),
    ("pave: zero batch size", pave_row(batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    ("pave: DARE drops everything", pave_row(dare={"sparsity_ratio": 1.0}),
     ValueError, r"dare\.sparsity_ratio must be in \[0, 1\), got 1\.0"),
    # SMILE (any architecture)
    ("smile: fine-tuned model of another architecture",
     lambda tmp_path: SmileUpscalingAlgorithm(gate_k=2, k=4).run(BaseModelPool({"_pretrained_": clip_vision(), "m0": decoder(num_hidden_layers=3)})),
     ValueError, r"encoder\.layers\.0\.self_attn\.k_proj: missing in fine-tuned model 0"),
    ("smile: fine-tuned layer of another shape", smile_row(lambda: clip_family(edit=smile_shape)),
     ValueError, r"layers\.0\.mlp\.fc1: fine-tuned model 0 has weight shape \(48, 32\), pretrained has \(64, 32\)"),
    ("smile: no fine-tuned models (T=0)", smile_row(lambda: clip_family(0)),
     ValueError, r"no fine-tuned models given \(T=0\)"),
    ("smile: NaN in fine-tuned weights", smile_row(lambda: clip_family(edit=smile_nan)),
     ValueError, r"layers\.0\.mlp\.fc1: fine-tuned model 1 has non-finite weights"),
    ("smile: inf in pretrained bias", smile_row(lambda: clip_family(edit=smile_inf_pretrained)),
     ValueError, r"layers\.0\.mlp\.fc1: pretrained has non-finite weights"),
    ("smile: gate_k = 0", smile_row(clip_family, gate_k=0), ValueError, r"gate_k=0 out of range \[1, 32\]"),
    ("smile: top_k > T", smile_row(clip_family, top_k=3),
     ValueError, r"top_k must be in \[1, 2\] \(the number of fine-tuned models\), got 3"),
    ("smile layer: top_k > num_experts", lambda tmp_path: SmileLinear(32, 32, num_experts=2, gate_k=1, k=4, top_k=3),
     ValueError, r"top_k must be in \[1, 2\] \(num_experts\), got 3"),
    ("smile: unknown SVD method", smile_row(clip_family, svd_method="lanczos"),
     ValueError, r"unknown SVD method 'lanczos'"),
    ("smile: model_path is not a SMILE checkpoint", not_a_smile_checkpoint,
     FileNotFoundError, r"smile is not a SMILE checkpoint \(expected smile\.json and smile\.safetensors\)"),
    ("smile: corrupt saved checkpoint", corrupt_smile_checkpoint,
     ValueError, r"smile/smile\.safetensors: missing, corrupt or truncated safetensors file"),
    ("smile: output directory exists", existing_smile_output,
     FileExistsError, r"smile already exists; pass overwrite=true to replace it"),
    # SMILE causal LM
    ("smile mistral: top_k > T", mistral_row(num_experts_per_tok=3),
     ValueError, r"num_experts_per_tok must be in \[1, 2\] \(the number of fine-tuned models\), got 3"),
    ("smile mistral: router rank below 1", mistral_row(rank_of_router=0),
     ValueError, r"layers\.0\.self_attn\.q_proj: gate_k=0 out of range \[1, 32\]"),
    ("smile mistral: corrupt safetensors while streaming", corrupt_streaming_checkpoint,
     ValueError, r"m1/model\.safetensors: corrupt or truncated safetensors file"),
    # model pools (FusionBench's, through our yaml) and the program
    ("pool: missing model path (PAVE)", pave_on_missing_model,
     FileNotFoundError, r"model 'tiny_shape': checkpoint path .*no_such_model does not exist \(fix modelpool\.models\.tiny_shape\)"),
    ("pool: missing model path (SMILE, T5)", smile_on_missing_t5,
     FileNotFoundError, r"model 'topic': checkpoint path .*no_such_t5 does not exist"),
    ("pool: corrupt safetensors (PAVE)", pave_on_corrupt_safetensors,
     ValueError, r"model 'tiny_color': .*tiny_color holds a corrupt or truncated safetensors file"),
    ("program: merged model path exists", merged_model_path_exists,
     FileExistsError, r"merged already exists; pass overwrite=true to replace it"),
    ("pool: save over an existing model", save_over_existing_model,
     FileExistsError, r"merged already exists; pass overwrite=true to replace it"),
    ("taskpool: empty test dataset", evaluate_on_an_empty_test_split,
     ValueError, r"task 'topic': its test dataset is empty \(0 rows\); nothing to evaluate"),
    ("taskpool: test task without label words",
     lambda tmp_path: LabelWordsTaskPool(test_datasets={"a": [], "b": []}, tokenizer="t5", label_words={"a": ["x"]}),
     ValueError, r"label_words has no entry for test task\(s\) \['b'\]"),
    ("cli: unknown method name", lambda tmp_path: compose_fusion_bench(["method=pave_tie"]),
     MissingConfigException, r"Could not find 'method/pave_tie'"),
    ("cli: unknown model pool name", lambda tmp_path: compose_fusion_bench(["modelpool=tiny_vit"]),
     MissingConfigException, r"Could not find 'modelpool/tiny_vit'"),
    # ---------------- outputs: overwrite and sweep summaries (issue 14); keep this block last
    ("pool: overwrite=true over a directory holding foreign files", lambda tmp_path: overwrite_foreign_files(tmp_path, False),
     FileExistsError, r"merged holds files fusion_bench_pave did not write there \(not in its "
                      r"\.fusion_bench_pave-manifest\.json\): eval_notes\.txt; overwrite=true replaces only what we wrote"),
    ("program: overwrite=true over a directory holding foreign files", lambda tmp_path: overwrite_foreign_files(tmp_path, True),
     FileExistsError, r"merged holds files fusion_bench_pave did not write there .*: eval_notes\.txt;"),
    ("summarize: metric in no report", summarize_by_typo,
     ValueError, r"^metric 'a\.acc' is in no job's report; available metrics, closest first: a\.accuracy, average\.accuracy$"),
    ("summarize: empty directory", lambda tmp_path: summarize(tmp_path),
     ValueError, r"^no jobs found under .*: expected a multirun directory .* whose job subdirectories 0/, 1/, \.\.\. "
                 r"hold overrides\.yaml and program_report\.json$"),
    ("summarize: every job crashed", summarize_crashed,
     ValueError, r"^none of the 1 jobs under .* has a program_report\.json:\n  0: RuntimeError: out of memory \(see .*/0/cli\.log\)$"),
    ("summarize: a file instead of a directory", lambda tmp_path: summarize(Path(__file__)),
     NotADirectoryError, r"test_bad_inputs\.py is a file; summarize expects a sweep directory"),
    # ---- issue 14 (r2-pave): keys, types, pools and merger, all checked before any work ----
    ("pave: unknown key (+method.rhoo typo)", lambda tmp_path: pave(rhoo=0.5),
     TypeError, r"PAVE has no key 'rhoo' \(did you mean 'rho'\? valid keys: merger, rho, allocation,"),
    ("smile: unknown key", lambda tmp_path: SmileUpscalingAlgorithm(gate_k=2, topk=2),
     TypeError, r"SmileUpscalingAlgorithm has no key 'topk' \(did you mean 'top_k'\?"),
    ("smile mistral: unknown key", lambda tmp_path: SmileMistralUpscalingAlgorithm(rank_of_expet=4),
     TypeError, r"SmileMistralUpscalingAlgorithm has no key 'rank_of_expet' \(did you mean 'rank_of_expert'\?"),
    ("cli: unknown method key", lambda tmp_path: instantiate(compose_fusion_bench(["method=pave_ties", "+method.rhoo=0.5"]).method),
     TypeError, r"PAVE has no key 'rhoo' \(did you mean 'rho'\?"),
    ("pave: rho not a number (method.rho=abc)", pave_first(rho="abc"),
     TypeError, r"rho must be a number, got 'abc' \(str\)"),
    ("pave: num_samples not an integer", pave_first(num_samples=12.5),
     TypeError, r"num_samples must be an integer, got 12\.5 \(float\)"),
    ("pave: num_rows not an integer", pave_first(num_rows="all"),
     TypeError, r"num_rows must be an integer or null, got 'all' \(str\)"),
    ("pave: mask_padding not a boolean", pave_first(mask_padding="no"),
     TypeError, r"mask_padding must be a boolean \(true/false\), got 'no' \(str\)"),
    ("pave: eps0 = 0 (doubling would never end)", pave_first(eps0=0.0), ValueError, r"eps0 must be > 0, got 0\.0"),
    ("pave: unknown DARE key", pave_first(dare={"sparsity_ratio": 0.5, "rescle": False}),
     TypeError, r"dare has no key 'rescle' \(valid keys: sparsity_ratio, rescale, only_on_linear_weights\)"),
    ("pave: DARE sparsity not a number", pave_first(dare={"sparsity_ratio": "half"}),
     TypeError, r"dare\.sparsity_ratio must be a number in \[0, 1\), got 'half'"),
    ("smile: k not an integer", smile_row(clip_family, k="abc"), TypeError, r"k must be an integer, got 'abc' \(str\)"),
    ("smile: top_k a boolean", smile_row(clip_family, top_k=True), TypeError, r"top_k must be an integer, got True \(bool\)"),
    ("smile mistral: max_shard_gb not a number", mistral_row(max_shard_gb="big"),
     TypeError, r"max_shard_gb must be a number, got 'big' \(str\)"),
    ("pave: misspelled task in calibration_datasets", pave_first(calibration_datasets={"tsak0": "/data/task0"}),
     ValueError, r"calibration_datasets names task\(s\) \['tsak0'\] that the model pool does not have; its tasks are \['task0', 'task1', 'task2'\]"),
    ("pave: our SMILE as merger", pave_first(merger={"_target_": "fusion_bench_pave.smile.algorithm.SmileUpscalingAlgorithm", "k": 4}),
     ValueError, r"merger\._target_='fusion_bench_pave\.smile\.algorithm\.SmileUpscalingAlgorithm' does not merge the fine-tuned models"),
    ("pave: FusionBench's SMILE as merger", pave_first(merger={"_target_": "fusion_bench.method.SmileUpscalingAlgorithm"}),
     ValueError, r"merger\._target_='fusion_bench\.method\.SmileUpscalingAlgorithm' does not merge the fine-tuned models .*"
                 r"Use one of FusionBench's: .*RegMeanAlgorithm, .*TaskArithmeticAlgorithm"),
    ("pave: exclude_modules excludes every Linear", pave_first(pretrained=True, exclude_modules=["*"]),
     ValueError, r"exclude_modules=\['\*'\] excludes all 12 linear layers of the model, so PAVE would purify nothing"),
    ("pave: model without any nn.Linear", no_linear_pool,
     ValueError, r"the model \(Sequential\) has no nn\.Linear or transformers Conv1D module; PAVE purifies the "
                 r"weights of those only"),
    ("pave: T5 pool with a CLIP task pool", pave_first(pretrained=True, kind="t5", program=program_with_taskpool("clip")),
     ValueError, r"the task pool CLIPVisionTaskPool evaluates image models \(pixel_values input\), but the model pool "
                 r"CalibrationPool holds language models \(input_ids input, LM head\) \(its pretrained model is a T5ForConditionalGeneration\)"),
    ("pave: CLIP pool with a label-word task pool", pave_first(pretrained=True, program=program_with_taskpool("t5")),
     ValueError, r"the task pool LabelWordsTaskPool evaluates language models .* holds image models \(pixel_values input\)"),
    ("smile: CLIP models with a label-word task pool", smile_with_taskpool(SmileUpscalingAlgorithm(gate_k=2, k=4), clip_family, "t5"),
     ValueError, r"the task pool LabelWordsTaskPool evaluates language models .* holds image models"),
    ("smile mistral: CLIP task pool", smile_with_taskpool(SmileMistralUpscalingAlgorithm(rank_of_router=2, rank_of_expert=4), mistral_family, "clip"),
     ValueError, r"the task pool CLIPVisionTaskPool evaluates image models \(pixel_values input\), but the model pool BaseModelPool holds language models"),
]


@pytest.mark.parametrize("run, error, message", [pytest.param(*row[1:], id=row[0]) for row in ROWS])
def test_bad_input_gets_a_clear_error(tmp_path, run, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path)


def test_failed_runs_leave_no_output(tmp_path):
    """Rows that write: nothing appears at the target when they fail."""
    with pytest.raises(ValueError):
        corrupt_streaming_checkpoint(tmp_path)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_an_unreadable_covariance_cache_is_recomputed(tmp_path, caplog):
    first = pave(cache_dir=str(tmp_path)).run(make_pool("clip"))["model"]
    for file in tmp_path.glob("pave_cov_*.safetensors"):
        truncate(file)
    second = pave(cache_dir=str(tmp_path)).run(make_pool("clip"))
    assert second["pave"]["covariance_cache_hits"] == 0
    assert "is unreadable; recomputing it" in caplog.text
    for key, value in first.state_dict().items():
        assert torch.equal(second["model"].state_dict()[key], value), key
    assert pave(cache_dir=str(tmp_path)).run(make_pool("clip"))["pave"]["covariance_cache_hits"] == 3


def test_table_covers_every_entry_point():
    ids = [row[0] for row in ROWS]
    assert len(ids) == len(set(ids))
    for prefix in ["pave:", "rank allocator:", "smile:", "smile layer:", "smile mistral:", "pool:", "program:", "taskpool:", "cli:",
                   "summarize:"]:
        assert any(i.startswith(prefix) for i in ids), prefix


def test_cli_refuses_a_task_pool_of_another_model_kind_before_any_work(tmp_path):
    """Through the real program: the message names both command-line choices, and no covariance
    was collected (the merge would have run for minutes before the evaluation failed)."""
    args = ["method=pave_ta", "modelpool=tiny_t5", "taskpool=tiny_clip", f"method.cache_dir={tmp_path / 'cache'}",
            f"path.log_dir={tmp_path / 'log'}"]
    proc = fusion_bench_cli(args, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("ValueError: the task pool CLIPVisionTaskPool (taskpool=tiny_clip) evaluates image models (pixel_values "
            "input), but the model pool Seq2SeqLMPool (modelpool=tiny_t5) holds language models (input_ids input, "
            "LM head) (its pretrained model is a T5ForConditionalGeneration)") in output
    assert "PAVE covariance [" not in output and not list((tmp_path / "cache").iterdir())
# ============================================================================================
# Reusing a SMILE model_path (issue 14): a saved model carries its settings and the fingerprints
# of its input models; another request at the same path is refused, never silently served.
REUSE_REMEDY = r"; refusing to reuse it: choose a new model_path, or delete .*/smile to upscale again$"


def reuse_clip(first: dict, second: dict, edit_second: Callable | None = None) -> Callable:
    """Upscale the tiny CLIP family with ``first`` into tmp_path/smile, then request ``second`` there."""
    def run(tmp_path):
        path = str(tmp_path / "smile")
        SmileUpscalingAlgorithm(model_path=path, **first).run(BaseModelPool(clip_family()))
        SmileUpscalingAlgorithm(model_path=path, **second).run(BaseModelPool(clip_family(edit=edit_second)))
    return run


def another_m1(models):
    smile_fc1(models).weight[0, 0] += 1.0


def without_record(run: Callable) -> Callable:
    """``run`` twice at tmp_path/smile, the saved record deleted in between (as older versions saved)."""
    def twice(tmp_path):
        run(tmp_path)
        (tmp_path / "smile" / "smile_upscaling.json").unlink()
        run(tmp_path)
    return twice


def reuse_mistral_checkpoints(tmp_path, **second):
    """Stream the tiny Mistral family (saved as safetensors) with rank_of_expert 4 into tmp_path/smile,
    then request ``second`` there."""
    models = {name: str(tmp_path / name) for name in mistral_family()}
    for name, model in mistral_family().items():
        model.save_pretrained(models[name])
    settings = {"rank_of_router": 2, "rank_of_expert": 4, "model_path": str(tmp_path / "smile")}
    SmileMistralUpscalingAlgorithm(**settings).run(BaseModelPool(models))
    SmileMistralUpscalingAlgorithm(**{**settings, **second}).run(BaseModelPool(models))


REUSE_ROWS = [
    ("smile: model_path built with another k", reuse_clip({"gate_k": 2, "k": 4}, {"gate_k": 2, "k": 16}),
     ValueError, r"model_path .*/smile holds a SMILE model built differently \(k: saved 4, requested 16\)" + REUSE_REMEDY),
    ("smile: model_path built with other settings",
     reuse_clip({"gate_k": 2, "k": 4}, {"gate_k": 3, "k": 4, "top_k": 2, "dtype": "bfloat16"}),
     ValueError, r"built differently \(dtype: saved None, requested 'torch\.bfloat16'; gate_k: saved 2, requested 3; "
                 r"top_k: saved 1, requested 2\)" + REUSE_REMEDY),
    ("smile: model_path built from another fine-tuned model", reuse_clip({"gate_k": 2, "k": 4}, {"gate_k": 2, "k": 4}, another_m1),
     ValueError, r"built differently \(model 'm1': its weights differ from those the saved model was built from\)" + REUSE_REMEDY),
    ("smile: model_path saved without its settings (older format)",
     without_record(lambda tmp_path: smile_row(clip_family, model_path=str(tmp_path / "smile"))(tmp_path)),
     ValueError, r"model_path .*/smile holds no smile_upscaling\.json \(a SMILE model saved by an older version, or not one "
                 r"at all\), so it cannot be matched with the requested settings and models" + REUSE_REMEDY),
    ("smile mistral: streamed model_path built with another rank_of_expert",
     lambda tmp_path: reuse_mistral_checkpoints(tmp_path, rank_of_expert=16),
     ValueError, r"model_path .*/smile holds a SMILE model built differently \(rank_of_expert: saved 4, requested 16\)" + REUSE_REMEDY),
    ("smile mistral: model_path saved without its settings (older format)",
     without_record(lambda tmp_path: mistral_row(model_path=str(tmp_path / "smile"))(tmp_path)),
     ValueError, r"model_path .*/smile holds no smile_upscaling\.json" + ".*" + REUSE_REMEDY),
]


@pytest.mark.parametrize("run, error, message", [pytest.param(*row[1:], id=row[0]) for row in REUSE_ROWS])
def test_reusing_a_smile_model_path_gets_a_clear_error(tmp_path, run, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path)
