"""``nn.MultiheadAttention`` (open_clip's ViTs and text towers, torch's Transformer layers) as PAVE sees it.

MHA keeps q, k and v packed in one ``in_proj_weight`` [3d, d] and applies ``out_proj`` inside its
attention function, reading its weight without calling the module, so no Linear hook sees either
input. PAVE leaves them unpurified unless asked (``purify_attention``); then the packed weight is
three layers ``<mha>.in_proj_q`` / ``in_proj_k`` / ``in_proj_v`` [d, d] (its row blocks, as the q/k/v
Linears of a Hugging Face model), reading the query, key and value (one tensor in self-attention),
and ``<mha>.out_proj`` reads the attention output. `attention_hooks` captures both inputs exactly:
a forward pre-hook hands query/key/value to the in_proj layers' hooks, and the MHA runs with an
identity out_proj (z I^T + 0 = z, exactly) whose result z goes through the real ``out_proj`` module,
so its own Linear hook fires on z and the MHA returns out_proj(z) as its slow path computes it (the
fused fast path, which MHA takes in eval mode without gradients, rounds differently in float32).
Inputs of an MHA that is not batch_first are handed over batch first, so token masks line up.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

Hook = Callable[[nn.Module, tuple, object], None]  # the collector's Linear hook: (module, args, output)
IN_PROJ = ("q", "k", "v")
IN_PROJ_LAYERS = tuple(f"in_proj_{part}" for part in IN_PROJ)


def attention_modules(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """{name: module} of the nn.MultiheadAttention modules of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def out_proj_names(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` Linears that an MHA applies without calling them."""
    return {f"{name}.out_proj" for name in attention_modules(model)}


def attention_layer_names(model: nn.Module) -> set[str]:
    """The layer names PAVE gives nn.MultiheadAttention's weights: '<mha>.in_proj_q|k|v', '<mha>.out_proj'."""
    return {f"{name}.{layer}" for name in attention_modules(model) for layer in (*IN_PROJ_LAYERS, "out_proj")}


def in_proj_rows(model: nn.Module) -> dict[str, tuple[nn.MultiheadAttention, slice]]:
    """{'<mha>.in_proj_q': (mha, rows of in_proj_weight), ...}; ValueError for an MHA with separate
    q/k/v weights (kdim or vdim != embed_dim), which PAVE does not purify."""
    rows = {}
    for name, mha in attention_modules(model).items():
        if mha.in_proj_weight is None:
            raise ValueError(
                f"nn.MultiheadAttention '{name}' has separate q/k/v weights (kdim/vdim != embed_dim); "
                "purify_attention supports packed in_proj_weight only: set purify_attention=false."
            )
        d = mha.embed_dim
        for i, part in enumerate(IN_PROJ):
            rows[f"{name}.in_proj_{part}"] = (mha, slice(i * d, (i + 1) * d))
    return rows


def batch_first(mha: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """`x` as [batch, seq, d] (MHA's [seq, batch, d] transposed unless batch_first or unbatched)."""
    return x if mha.batch_first or x.dim() < 3 else x.transpose(0, 1)


class _Restore:
    """Handle of a patched MHA forward: ``remove`` restores the class's own."""

    def __init__(self, mha: nn.MultiheadAttention):
        self.mha = mha

    def remove(self) -> None:
        self.mha.__dict__.pop("forward", None)


def route_out_proj(mha: nn.MultiheadAttention) -> _Restore:
    """Make `mha` call its ``out_proj`` module on the attention output (so Linear hooks on it fire)
    until the returned handle is removed; its output is the slow path's (module docstring)."""
    attend = mha.forward
    out_proj = mha.out_proj
    identity = nn.Linear(mha.embed_dim, mha.embed_dim, device=out_proj.weight.device, dtype=out_proj.weight.dtype)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(mha.embed_dim))
        identity.bias.zero_()

    def forward(*args, **kwargs):
        mha.out_proj = identity
        try:
            z, weights = attend(*args, **kwargs)
        finally:
            mha.out_proj = out_proj
        return batch_first(mha, out_proj(batch_first(mha, z))), weights

    mha.forward = forward
    return _Restore(mha)


def attention_hooks(name: str, mha: nn.MultiheadAttention, hooks: dict[str, Hook], out_proj: bool) -> list:
    """Handles of the hooks that feed `mha`'s inputs to the collector: ``hooks`` maps some of
    '<name>.in_proj_q|k|v' to the hook of that layer (called with the query, key or value, batch
    first); with `out_proj`, the MHA calls its out_proj module (hooked like any Linear)."""
    handles = []
    if hooks:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = dict(zip(("query", "key", "value"), args)) | kwargs
            views: dict[int, Tensor] = {}  # one batch-first view per distinct tensor: shared inputs stay shared
            for part, key in zip(IN_PROJ, ("query", "key", "value")):
                hook = hooks.get(f"{name}.in_proj_{part}")
                if hook is not None:
                    x = inputs[key]
                    hook(module, (views.setdefault(id(x), batch_first(mha, x)),), None)

        handles.append(mha.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if out_proj:
        handles.append(route_out_proj(mha))
    return handles
