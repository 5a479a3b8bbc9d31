"""Checks shared by PAVE and SMILE on named tensors of models that must share one architecture
(torch only); each caller words its own error around the name found."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor


def shape_of(tensor: Optional[Tensor]) -> Optional[tuple[int, ...]]:
    return None if tensor is None else tuple(tensor.shape)


def first_nonfinite(tensors: Mapping[str, Optional[Tensor]]) -> Optional[str]:
    """Name of the first floating-point tensor holding a NaN or inf, else None."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def first_shape_mismatch(reference: Mapping[str, Optional[Tensor]], tensors: Mapping[str, Optional[Tensor]]) -> Optional[str]:
    """Name of the first tensor of `tensors` whose shape (or absence, None) differs from the
    reference tensor of that name, else None."""
    for name, tensor in tensors.items():
        if shape_of(tensor) != shape_of(reference.get(name)):
            return name
    return None
