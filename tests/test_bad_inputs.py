"""What a careless user gets: one table of bad inputs to every entry point (PAVE, SMILE, SMILE causal
LM, the model pools and the CLI's config composition) and the exact error each must raise.

Every row runs the real entry point on tiny models; the regexes match our messages, so a row fails
if its check is removed (the input would then pass silently or die with a different, raw error).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from datasets import Dataset
from hydra.errors import MissingConfigException
from torch import nn

import fusion_bench_pave  # noqa: F401  (transformers compat shim)
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils import instantiate
from fusion_bench_pave.pave import PAVE
from fusion_bench_pave.pave.rank_allocation import allocate_ranks
from fusion_bench_pave.smile import SmileLinear
from fusion_bench_pave.smile.algorithm import SmileMistralUpscalingAlgorithm, SmileUpscalingAlgorithm
from fusion_bench_pave.smile.causal_lm.upscale import SmileSettings, upscale_causal_lm_checkpoint
from fusion_bench_pave.smile.io import save_smile_model
from fusion_bench_pave.taskpool import LabelWordsTaskPool

from conftest import compose_fusion_bench
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
     ValueError, r"task 'task0': asked for 50 calibration samples but its train split has only 24 rows"),
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
    ("smile: expert rank k larger than the layer", smile_row(clip_family, k=33),
     ValueError, r"k_proj: k=33 out of range \(<= 0 for dense experts or \[1, 32\]\) for a 32x32 weight"),
    ("smile: router rank gate_k larger than the layer", smile_row(clip_family, gate_k=33),
     ValueError, r"k_proj: gate_k=33 out of range \[1, 32\] for a 32x32 weight"),
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
    ("smile mistral: expert rank larger than the layer", mistral_row(rank_of_expert=33),
     ValueError, r"q_proj: k=33 out of range"),
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
    assert "ignoring unreadable covariance cache" in caplog.text
    for key, value in first.state_dict().items():
        assert torch.equal(second["model"].state_dict()[key], value), key
    assert pave(cache_dir=str(tmp_path)).run(make_pool("clip"))["pave"]["covariance_cache_hits"] == 3


def test_table_covers_every_entry_point():
    ids = [row[0] for row in ROWS]
    assert len(ids) == len(set(ids))
    for prefix in ["pave:", "rank allocator:", "smile:", "smile layer:", "smile mistral:", "pool:", "program:", "taskpool:", "cli:"]:
        assert any(i.startswith(prefix) for i in ids), prefix
