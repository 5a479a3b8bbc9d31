"""Per-layer SMILE math: pretrained (W0, b0) and T fine-tuned (W_i, b_i) -> ``SmileLinear`` tensors.

Pure tensor-in/tensor-out functions (no modules, no files), shared by the in-memory model surgery
and the streaming safetensors upscaler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench_pave.smile.linear import smile_layout
from fusion_bench_pave.smile.svd import SvdMethod, top_svd
from fusion_bench_pave.tensor_checks import first_nonfinite, first_shape_mismatch, shape_of


def check_layer_inputs(name: str, w0: Tensor, ws: Sequence[Tensor], b0: Tensor | None, bs: Sequence[Tensor | None], gate_k: int, k: int) -> None:
    """Raise a ``ValueError`` naming ``name`` for an empty expert list, shape mismatches, non-finite weights or ranks out of range."""
    check_layer_shapes(name, w0, ws, b0, bs, gate_k, k)
    tensors = [("pretrained", w0, b0), *((f"fine-tuned model {i}", w, b) for i, (w, b) in enumerate(zip(ws, bs)))]
    for label, w, b in tensors:
        if first_nonfinite({"weight": w, "bias": b}) is not None:
            raise ValueError(f"{name}: {label} has non-finite weights (NaN/inf)")


def check_layer_shapes(name: str, w0: Tensor, ws: Sequence[Tensor], b0: Tensor | None, bs: Sequence[Tensor | None], gate_k: int, k: int) -> None:
    """The checks of :func:`check_layer_inputs` that need no values (also for ``meta`` tensors, from checkpoint headers)."""
    if len(ws) == 0:
        raise ValueError(f"{name}: no fine-tuned models given (T=0); SMILE needs at least one expert")
    if w0.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D linear weight, got shape {tuple(w0.shape)}")
    if len(bs) != len(ws):
        raise ValueError(f"{name}: got {len(ws)} fine-tuned weights but {len(bs)} biases")
    reference = {"weight": w0, "bias": b0}
    for i, (w, b) in enumerate(zip(ws, bs)):
        if (key := first_shape_mismatch(reference, {"weight": w, "bias": b})) is not None:
            mine = w if key == "weight" else b
            raise ValueError(f"{name}: fine-tuned model {i} has {key} shape {shape_of(mine)}, pretrained has {shape_of(reference[key])}")
    max_rank = min(w0.shape)
    if not 1 <= gate_k <= max_rank:
        raise ValueError(f"{name}: gate_k={gate_k} out of range [1, {max_rank}] for a {w0.shape[0]}x{w0.shape[1]} weight")
    if k > max_rank:
        raise ValueError(f"{name}: k={k} out of range (<= 0 for dense experts or [1, {max_rank}]) for a {w0.shape[0]}x{w0.shape[1]} weight")


def layer_ranks(shape: Sequence[int], gate_k: int, k: int) -> tuple[int, int]:
    """The (gate_k, k) one layer of weight shape [out, in] takes from the model-wide settings.

    The rule: both are clamped to the layer's full rank R = min(out, in), where an expert of rank
    R is already exact, so one setting fits every layer (a 2-row classifier, the narrow k/v
    projections of grouped-query attention). k <= 0 (dense experts) is kept; gate_k < 1 is left
    for `check_layer_inputs` to refuse.
    """
    full = min(shape)
    return min(gate_k, full), (min(k, full) if k > 0 else k)


def layer_changed(w0: Tensor, ws: Sequence[Tensor], b0: Tensor | None = None, bs: Sequence[Tensor | None] = ()) -> bool:
    """True if any fine-tuned weight or bias differs (exactly) from the pretrained one."""
    return any(not torch.equal(w, w0) for w in ws) or (b0 is not None and any(not torch.equal(b, b0) for b in bs if b is not None))


@torch.no_grad()
def smile_tensors(
    w0: Tensor,
    ws: Sequence[Tensor],
    b0: Tensor | None,
    bs: Sequence[Tensor | None],
    gate_k: int,
    k: int,
    routing_use_diff: bool = True,
    svd_method: SvdMethod = "auto",
    compute_device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    name: str = "layer",
) -> dict[str, Tensor]:
    """The ``SmileLinear`` state dict for one layer (keys, shapes and order of ``smile_layout``).

    SVD runs in float32 (float64 inputs stay float64) on ``compute_device``; results are cast to
    ``dtype`` (default: ``w0.dtype``) on ``w0``'s device. Layers whose experts equal the
    pretrained layer are the caller's business (see :func:`layer_changed`).
    """
    check_layer_inputs(name, w0, ws, b0, bs, gate_k, k)
    out_dtype, out_device = dtype or w0.dtype, w0.device
    dev = compute_device or w0.device
    base = w0.to(dev, torch.float64 if w0.dtype == torch.float64 else torch.float32)
    routers, us, svhs, dense = [], [], [], []
    for w in ws:
        dw = w.to(dev, base.dtype) - base
        rank = max(gate_k, k)
        t = top_svd(dw, rank, svd_method)
        if routing_use_diff:
            routers.append(t.v[:, :gate_k].T)
        else:
            routers.append(top_svd(w.to(dev, base.dtype), gate_k, svd_method).v.T)
        if k > 0:
            us.append(t.u[:, :k])
            svhs.append(t.s[:k, None] * t.v[:, :k].T)
        else:
            dense.append(dw)
    cast = lambda t: t.to(out_device, out_dtype).contiguous()  # noqa: E731
    tensors = {"weight": w0.detach().to(out_dtype), "router": cast(torch.stack(routers))}
    if k > 0:
        tensors |= {"expert_u": cast(torch.stack(us)), "expert_svh": cast(torch.stack(svhs))}
    else:
        tensors["expert_weight"] = cast(torch.stack(dense))
    if b0 is not None:
        tensors["bias"] = b0.detach().to(out_dtype)
        tensors["expert_bias"] = cast(torch.stack([b.to(dev, base.dtype) - b0.to(dev, base.dtype) for b in bs]))
    return {key: tensors[key] for key in smile_layout(w0.shape[1], w0.shape[0], len(ws), gate_k, k, b0 is not None)}
