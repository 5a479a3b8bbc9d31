"""The linear layers PAVE purifies and SMILE upscales, seen through one weight layout.

torch's ``nn.Linear`` stores W [out, in] and computes x W^T + b; transformers' ``Conv1D`` (GPT-2,
GPT-J's and OpenAI-GPT's attention and MLP) stores W [in, out] and computes x W + b. Both read the
same [..., in] input, so their input statistics are collected alike, and every piece of math works
on the [out, in] view (``linear_weight``), written back in the module's own layout.

Modules with a weight matrix that are neither (``nn.Conv2d`` patch embeddings, ``nn.MultiheadAttention``
projections, custom layers) are listed by ``unhandled_weight_modules`` so the algorithms can say
loudly that they leave them as they are.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Callable

from torch import Tensor, nn


def _conv1d_type() -> type | None:
    """transformers' Conv1D class if transformers is loaded (no instance can exist otherwise), so
    this module imports with torch alone."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear (or subclass) or a transformers Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as [out, in] (a view for Conv1D: no copy)."""
    weight = module.weight.data
    return weight.T if is_conv1d(module) else weight


def set_linear_weight(module: nn.Module, weight: Tensor) -> None:
    """Store `weight` [out, in] in the module's layout (contiguous, as safetensors needs)."""
    module.weight.data = weight.T.contiguous() if is_conv1d(module) else weight


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer, None for any other module."""
    if not is_linear(module):
        return None
    out_features, in_features = linear_weight(module).shape
    return in_features, out_features


def is_exactly_linear(module: nn.Module) -> bool:
    """An nn.Linear or Conv1D itself, not a subclass: a module some parent may bypass (nn.MultiheadAttention
    reads its NonDynamicallyQuantizableLinear out_proj's weight without calling it) is not replaceable."""
    return type(module) is nn.Linear or type(module) is _conv1d_type()


def unhandled_weight_modules(model: nn.Module, handled: Callable[[nn.Module], bool] = is_linear) -> dict[str, str]:
    """{name: type name} of the modules with a weight matrix of their own (a parameter of 2 or more
    dimensions) that `handled` rejects; embeddings (lookup tables, not maps of the activations)
    are not listed."""
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if not handled(module) and not isinstance(module, nn.Embedding)
        and any(p.ndim >= 2 for p in module.parameters(recurse=False))
    }


def type_summary(modules: dict[str, str], shown: int = 3) -> str:
    """'Conv2d x1 (embeddings.patch_embedding), ...': each type, its count and its first names."""
    counts = Counter(modules.values())
    parts = []
    for kind, count in counts.most_common():
        names = [name for name, k in modules.items() if k == kind]
        more = ", ..." if len(names) > shown else ""
        parts.append(f"{kind} x{count} ({', '.join(names[:shown])}{more})")
    return "; ".join(parts)
