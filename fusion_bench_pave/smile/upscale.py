"""Model surgery: replace every changed ``nn.Linear`` of a pretrained model by a ``SmileLinear``.

Works for any architecture (CLIP vision, T5, ...): modules are matched by name between the
pretrained model and the fine-tuned copies. The fine-tuned models are only read, never modified.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench_pave.smile.decompose import check_layer_inputs, layer_changed, smile_tensors
from fusion_bench_pave.smile.linear import SmileLinear
from fusion_bench_pave.smile.svd import SvdMethod

log = logging.getLogger(__name__)


@dataclass
class UpscaleReport:
    """Which modules were upscaled, left pretrained (unchanged / not targeted) or averaged."""

    upscaled: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    not_targeted: list[str] = field(default_factory=list)
    averaged: list[str] = field(default_factory=list)


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(re.fullmatch(p, name) for p in patterns)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``root`` by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _counterparts(name: str, models: Sequence[nn.Module], kind: type[nn.Module]) -> list[nn.Module]:
    found = []
    for i, m in enumerate(models):
        try:
            sub = m.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name}: missing in fine-tuned model {i}; the models must share the pretrained architecture") from None
        if not isinstance(sub, kind):
            raise ValueError(f"{name}: fine-tuned model {i} has a {type(sub).__name__} where the pretrained model has a {kind.__name__}")
        found.append(sub)
    return found


@torch.no_grad()
def average_leaf(target: nn.Module, sources: Sequence[nn.Module], name: str) -> None:
    """Set every parameter/buffer of the leaf module ``target`` to the mean over ``sources``."""
    for key, t in list(target.named_parameters(recurse=False)) + list(target.named_buffers(recurse=False)):
        values = [dict(s.named_parameters(recurse=False)) | dict(s.named_buffers(recurse=False)) for s in sources]
        stacked = [v[key] for v in values]
        if any(s.shape != t.shape for s in stacked):
            raise ValueError(f"{name}.{key}: shape mismatch between pretrained {tuple(t.shape)} and fine-tuned models")
        if t.is_floating_point():
            t.copy_(torch.stack([s.to(t.dtype) for s in stacked]).mean(0))


@torch.no_grad()
def upscale_model(
    pretrained: nn.Module,
    finetuned: Sequence[nn.Module],
    *,
    gate_k: int,
    k: int,
    top_k: int = 1,
    routing_use_diff: bool = True,
    average_experts: bool = False,
    target_modules: Sequence[str] | None = None,
    svd_method: SvdMethod = "auto",
    compute_device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[nn.Module, UpscaleReport]:
    """Upscale ``pretrained`` in place into a SMILE MoE model and return it with a report.

    Every ``nn.Linear`` whose name fully matches one of the regexes ``target_modules`` (default:
    all) and differs in at least one fine-tuned model becomes a ``SmileLinear`` with
    ``len(finetuned)`` experts. ``average_experts`` replaces the parameters of the other leaf
    modules (norms, embeddings, convs) by the fine-tuned average. Raises ``ValueError`` for
    T=0, mismatched architectures or shapes, ranks out of range, or when no layer changed.
    """
    if len(finetuned) == 0:
        raise ValueError("no fine-tuned models given (T=0); SMILE needs at least one expert")
    if not 1 <= top_k <= len(finetuned):
        raise ValueError(f"top_k must be in [1, {len(finetuned)}] (the number of fine-tuned models), got {top_k}")
    report = UpscaleReport()
    # validate every targeted layer before any SVD, so bad input fails fast and leaves the model untouched
    plan: list[tuple[str, nn.Linear, list[nn.Linear]]] = []
    for name, module in pretrained.named_modules():
        if type(module) is not nn.Linear:
            continue
        experts = _counterparts(name, finetuned, nn.Linear)
        if not _matches(name, target_modules):
            report.not_targeted.append(name)
            continue
        ws, bs = [e.weight for e in experts], [e.bias for e in experts]
        check_layer_inputs(name, module.weight, ws, module.bias, bs, gate_k, k)
        if layer_changed(module.weight, ws, module.bias, bs):
            plan.append((name, module, experts))
        else:
            report.unchanged.append(name)
    if not plan:
        hint = f" matching target_modules={list(target_modules)}" if target_modules is not None else ""
        raise ValueError(f"no nn.Linear{hint} differs between the pretrained and the fine-tuned models; nothing to upscale")
    leaves = [
        (name, module) for name, module in pretrained.named_modules()
        if average_experts and type(module) is not nn.Linear and not list(module.children())
        and (next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None)
    ]
    for name, module in leaves:
        average_leaf(module, _counterparts(name, finetuned, type(module)), name)
        report.averaged.append(name)
    for name, module, experts in tqdm(plan, desc="SMILE upscaling", disable=not progress, dynamic_ncols=True, leave=False):
        tensors = smile_tensors(
            module.weight, [e.weight for e in experts], module.bias, [e.bias for e in experts],
            gate_k, k, routing_use_diff, svd_method, compute_device, dtype, name=name,
        )
        smile = SmileLinear(
            module.in_features, module.out_features, len(finetuned), gate_k, k, top_k,
            bias=module.bias is not None, device="meta",
        )
        smile.load_state_dict(tensors, assign=True)
        set_module(pretrained, name, smile)
        report.upscaled.append(name)
    if dtype is not None:
        pretrained.to(dtype)
    log.info("SMILE: upscaled %d linear layers, %d unchanged, %d not targeted, %d averaged",
             len(report.upscaled), len(report.unchanged), len(report.not_targeted), len(report.averaged))
    return pretrained, report
