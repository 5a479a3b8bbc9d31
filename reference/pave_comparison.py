"""The same seeded models and calibration rows through our PAVE and through the official procedure.

A setting (a dict) names the architecture (``kind``: bert | clip | mistral) and its widths, the
number of tasks T, the N token rows per task, batching and eps0; ``build`` makes a random model at
those widths, T perturbed "fine-tuned" copies and seeded calibration inputs of exactly N rows per
task. Both procedures use the official per-model rank collapse (allocation=per_model) and the
same rho, and return ({task: {layer: purified weight}}, {task: {layer: kept rank}}).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from fusion_bench_pave.pave.models import LinearWeights
from fusion_bench_pave.pave.purification import PurifySettings, purify
from fusion_bench_pave.pave.task_statistics import CollectionSettings
from fusion_bench_pave.pave.covariance import collect_covariance
from reference import tiny_models
from reference.official_pave import official_pave

MISTRAL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RHO = 0.9

Purified = tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, int]]]


def build_model(setting: dict, seed: int = 0) -> nn.Module:
    """A randomly initialised model at the setting's widths (float32, eval mode)."""
    kind, d, ffn, heads, layers = (setting[k] for k in ("kind", "hidden", "ffn", "heads", "layers"))
    shape = dict(hidden_size=d, intermediate_size=ffn, num_attention_heads=heads, num_hidden_layers=layers)
    if kind == "bert":
        return tiny_models.bert(seed, pooler=False, vocab_size=1000, max_position_embeddings=512, **shape)
    if kind == "clip":
        return tiny_models.clip_vision(seed, image_size=224, patch_size=32, **shape)
    return tiny_models.decoder("mistral", seed, lm_head=False, vocab_size=1024, num_key_value_heads=setting["kv_heads"],
                               sliding_window=None, **shape)


def calibration_batches(setting: dict, seed: int) -> list[dict]:
    """Seeded model inputs of one task holding at least `rows` token rows."""
    generator = torch.Generator().manual_seed(seed)
    if setting["kind"] == "clip":
        images = -(-setting["rows"] // 50)  # 50 tokens per 224px image at patch 32
        pixels = torch.randn(images, 3, 224, 224, generator=generator)
        return [{"pixel_values": p} for p in pixels.split(setting["batch"])]
    sequences = -(-setting["rows"] // setting["seq"])
    vocab = 1000 if setting["kind"] == "bert" else 1024
    ids = torch.randint(3, vocab, (sequences, setting["seq"]), generator=generator)
    return [{"input_ids": i} for i in ids.split(setting["batch"])]


def excluded(setting: dict) -> list[str]:
    """Linear names (last part) kept unpurified in this setting."""
    if "modules" not in setting:
        return []
    return [name for name in MISTRAL_LINEARS if name not in setting["modules"]]


def build(setting: dict) -> tuple[nn.Module, dict[str, nn.Module], dict[str, list[dict]]]:
    """(pretrained, {task: fine-tuned}, {task: batches}), all seeded."""
    pretrained = build_model(setting)
    tasks = [f"task{i}" for i in range(setting["tasks"])]
    finetuned = {t: tiny_models.perturbed(pretrained, 100 + i) for i, t in enumerate(tasks)}
    batches = {t: calibration_batches(setting, 200 + i) for i, t in enumerate(tasks)}
    return pretrained, finetuned, batches


def exact_reference(weight: torch.Tensor, cov_eps: torch.Tensor, rank: int) -> torch.Tensor:
    """The exact purified weight: U_r U_r^T W with U from the float64 SVD of W C_eps."""
    w = weight.to(torch.float64)
    u = torch.linalg.svd(w @ cov_eps.to(torch.float64), full_matrices=False)[0][:, :rank]
    return u @ (u.T @ w)


def max_error_vs_exact(purified: dict, ranks: dict, weights: dict, cov_eps: Callable[[str, str], torch.Tensor]) -> float:
    """Max over (task, layer) of ||W_purified - exact_reference||_F / ||exact_reference||_F, with the
    C_eps that cov_eps(task, layer) gives and the kept ranks {task: {layer: r}}."""
    worst = 0.0
    for task, layers in purified.items():
        for layer, w in layers.items():
            ref = exact_reference(weights[task][layer], cov_eps(task, layer), ranks[task][layer])
            worst = max(worst, float(torch.linalg.norm(w.double() - ref) / torch.linalg.norm(ref)))
    return worst


def run_ours(finetuned: dict[str, nn.Module], batches: dict[str, list[dict]], setting: dict, rho: float = RHO) -> Purified:
    """fusion_bench_pave's path: streaming covariance per task, then purification.purify written
    back into the models layer by layer (in place, as PAVE.run does)."""
    includes = CollectionSettings(num_rows=setting["rows"], exclude=tuple(excluded(setting))).includes
    stats = {
        task: collect_covariance(model, ((b, None) for b in batches[task]), includes, max_rows=setting["rows"])
        for task, model in finetuned.items()
    }
    settings = PurifySettings(rho=rho, allocation="per_model", eps0=setting["eps0"])
    linears = {t: LinearWeights(m) for t, m in finetuned.items()}
    _, ranks, _ = purify(linears, stats, settings, write=lambda t, layer, w: linears[t].write(layer, w))
    return {t: {l: linears[t][l] for l in ranks[t]} for t in finetuned}, ranks


@torch.no_grad()
def run_official(pretrained: nn.Module, finetuned: dict[str, nn.Module], batches: dict[str, list[dict]],
                 setting: dict, rho: float = RHO, dtype: torch.dtype = torch.float32) -> Purified:
    """The official procedure (W_tilde = tau + W_pre). It computes in the model dtype, float32 like
    the official code; `dtype=float64` runs it on float64 copies (to tell its float32 rounding apart
    from procedural differences)."""
    if dtype != torch.float32:
        pretrained = copy.deepcopy(pretrained).to(dtype)
        finetuned = {t: copy.deepcopy(m).to(dtype) for t, m in finetuned.items()}
        batches = {t: [{k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()} for b in bs]
                   for t, bs in batches.items()}
    exclude = tuple(excluded(setting))
    vectors, ratios = official_pave(pretrained, finetuned, batches, rho, setting["rows"], setting["eps0"], exclude=exclude)
    pre = dict(pretrained.named_parameters())
    layers = [name for name, m in finetuned[next(iter(finetuned))].named_modules()
              if isinstance(m, nn.Linear) and not name.endswith(exclude)]
    weights = {t: {l: vectors[t][f"{l}.weight"] + pre[f"{l}.weight"] for l in layers} for t in finetuned}
    ranks = {t: {l: max(1, round(min(w.shape) * ratios[t])) for l, w in weights[t].items()} for t in finetuned}
    return weights, ranks
