"""Model surgery: replace every changed linear layer of a pretrained model by a ``SmileLinear``.

Works for any architecture (CLIP vision, T5, BERT, GPT-2, Llama, ...): modules are matched by name
between the pretrained model and the fine-tuned copies, which are only read, never modified. A
linear layer is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2; weight [in, out]): a Conv1D
becomes a ``SmileLinear`` holding its transposed weight, the same map x W + b, so the model saves
and reloads like any other. The task heads (``head_modules``) are left pretrained unless
``target_modules`` names them: a head is what one task adds, not an expert of the shared body.
Ranks are clamped per layer (``decompose.layer_ranks``). Changed weights that stay pretrained
(heads, norms, convolutions, ... unless averaged) are reported and logged as a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench_pave.linear_layers import is_exactly_linear, linear_features, linear_weight, type_summary
from fusion_bench_pave.pave.heads import head_modules
from fusion_bench_pave.smile.decompose import check_layer_inputs, layer_changed, layer_ranks, smile_tensors
from fusion_bench_pave.smile.linear import SmileLinear
from fusion_bench_pave.smile.svd import SvdMethod

log = logging.getLogger(__name__)


@dataclass
class UpscaleReport:
    """Which linear layers were upscaled (with their ranks), left pretrained (unchanged, not
    targeted, heads) and which other modules were averaged or kept pretrained although changed."""

    upscaled: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    not_targeted: list[str] = field(default_factory=list)
    averaged: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)  # upscaled layer: (gate_k, k)
    kept_pretrained: dict[str, str] = field(default_factory=dict)  # changed, not upscaled/averaged: type


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


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))


def changed_modules(pretrained: nn.Module, finetuned: Sequence[nn.Module], skip: set[str]) -> dict[str, str]:
    """{name: type name} of the modules outside `skip` whose own floating-point parameters or
    buffers differ (exactly) in some fine-tuned model."""
    changed = {}
    for name, module in pretrained.named_modules():
        own = {key: t for key, t in _own_tensors(module).items() if t.is_floating_point()}
        if name in skip or not own:
            continue
        others = [_own_tensors(m) for m in _counterparts(name, finetuned, type(module))]
        if any(not torch.equal(t, other[key]) for key, t in own.items() for other in others):
            changed[name] = type(module).__name__
    return changed


@torch.no_grad()
def average_leaf(target: nn.Module, sources: Sequence[nn.Module], name: str) -> None:
    """Set every parameter/buffer of the leaf module ``target`` to the mean over ``sources``."""
    for key, t in _own_tensors(target).items():
        stacked = [_own_tensors(s)[key] for s in sources]
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

    Every ``nn.Linear`` / ``Conv1D`` whose name fully matches one of the regexes ``target_modules``
    (default: all but the heads) and differs in at least one fine-tuned model becomes a
    ``SmileLinear`` with ``len(finetuned)`` experts, of ranks ``layer_ranks`` of ``gate_k`` and
    ``k``. ``average_experts`` replaces the parameters of the other leaf modules (norms,
    embeddings, convs) by the fine-tuned average. Raises ``ValueError`` for T=0, mismatched
    architectures or shapes, gate_k < 1, or when no layer changed.
    """
    if len(finetuned) == 0:
        raise ValueError("no fine-tuned models given (T=0); SMILE needs at least one expert")
    if not 1 <= top_k <= len(finetuned):
        raise ValueError(f"top_k must be in [1, {len(finetuned)}] (the number of fine-tuned models), got {top_k}")
    report = UpscaleReport()
    # validate every targeted layer before any SVD, so bad input fails fast and leaves the model untouched
    heads = head_modules(pretrained) if target_modules is None else set()
    plan: list[tuple[str, nn.Module, list[nn.Module]]] = []
    for name, module in pretrained.named_modules():
        if not is_exactly_linear(module):
            continue
        experts = _counterparts(name, finetuned, type(module))
        if name in heads:
            report.heads.append(name)
            continue
        if not _matches(name, target_modules):
            report.not_targeted.append(name)
            continue
        w0, ws, bs = linear_weight(module), [linear_weight(e) for e in experts], [e.bias for e in experts]
        ranks = layer_ranks(w0.shape, gate_k, k)
        check_layer_inputs(name, w0, ws, module.bias, bs, *ranks)
        if layer_changed(w0, ws, module.bias, bs):
            plan.append((name, module, experts))
            report.ranks[name] = ranks
        else:
            report.unchanged.append(name)
    if not plan:
        hint = f" matching target_modules={list(target_modules)}" if target_modules is not None else ""
        if report.heads:
            hint += f" outside the heads {report.heads} (name them in target_modules to upscale them)"
        raise ValueError(f"no linear layer{hint} differs between the pretrained and the fine-tuned models; nothing to upscale")
    leaves = [
        (name, module) for name, module in pretrained.named_modules()
        if average_experts and not is_exactly_linear(module) and not list(module.children())
        and (next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None)
    ]
    for name, module in leaves:
        average_leaf(module, _counterparts(name, finetuned, type(module)), name)
        report.averaged.append(name)
    upscaled = {name for name, _, _ in plan}
    report.kept_pretrained = changed_modules(pretrained, finetuned, upscaled | set(report.averaged) | set(report.not_targeted))
    for name, module, experts in tqdm(plan, desc="SMILE upscaling", disable=not progress, dynamic_ncols=True, leave=False):
        layer_gate_k, layer_k = report.ranks[name]
        tensors = smile_tensors(
            linear_weight(module).contiguous(), [linear_weight(e) for e in experts], module.bias,
            [e.bias for e in experts], layer_gate_k, layer_k, routing_use_diff, svd_method, compute_device, dtype,
            name=name,
        )
        smile = SmileLinear(
            *linear_features(module), len(finetuned), layer_gate_k, layer_k, top_k,
            bias=module.bias is not None, device="meta",
        )
        smile.load_state_dict(tensors, assign=True)
        set_module(pretrained, name, smile)
        report.upscaled.append(name)
    if dtype is not None:
        pretrained.to(dtype)
    log_report(report, gate_k, k)
    return pretrained, report


def log_report(report: UpscaleReport, gate_k: int, k: int) -> None:
    """Counts, the layers whose ranks were clamped, and a warning naming changed weights left pretrained."""
    log.info("SMILE: upscaled %d linear layers, %d unchanged, %d not targeted, %d heads left pretrained, %d averaged",
             len(report.upscaled), len(report.unchanged), len(report.not_targeted), len(report.heads),
             len(report.averaged))
    log_clamped_ranks(report.ranks, gate_k, k)
    if report.kept_pretrained:
        log.warning(
            "SMILE keeps the PRETRAINED weights of these modules although the fine-tuned models changed "
            "them: %s. Heads are left pretrained unless target_modules names them; average_experts=true "
            "averages the other leaf modules (norms, embeddings, convolutions).", type_summary(report.kept_pretrained))


def clamped_ranks(ranks: dict[str, tuple[int, int]], gate_k: int, k: int) -> dict[str, tuple[int, int]]:
    """The layers of ``ranks`` (name -> (gate_k, k)) whose ranks differ from the model-wide ``(gate_k, k)``."""
    return {name: tuple(layer) for name, layer in ranks.items() if tuple(layer) != (gate_k, k)}


def log_clamped_ranks(ranks: dict[str, tuple[int, int]], gate_k: int, k: int) -> None:
    """Log the layers whose (gate_k, k) ``layer_ranks`` clamped to their full rank, with their ranks."""
    if clamped := clamped_ranks(ranks, gate_k, k):
        log.info("SMILE: ranks (gate_k, k) clamped to the layer's full rank, from (%d, %d): %s", gate_k, k,
                 ", ".join(f"{name} {layer}" for name, layer in clamped.items()))
