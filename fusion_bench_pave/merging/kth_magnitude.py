"""The exact k-th smallest magnitude of a tensor stream too large to hold: radix selection.

The bit pattern of a non-negative float, read as an integer, orders the same way as its value. Each
pass over the stream histograms one 16-bit digit of the magnitudes' bit patterns (among the entries
whose higher digits match those chosen so far) and picks the digit holding the k-th entry; after one
pass for 16-bit floats, two for float32 and four for float64, every bit is fixed and the result is the
exact k-th value, equal to ``torch.kthvalue`` over the concatenation. Memory: one 65536-bin histogram.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIGIT = 16
INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class KthMagnitude:
    """Feed every tensor of the stream to ``add`` once per pass and call ``end_pass`` after each pass,
    until ``done``; then ``value`` is the ``k``-th smallest |x| (1-based) over the stream."""

    def __init__(self, dtype: torch.dtype) -> None:
        if not dtype.is_floating_point or dtype.itemsize not in INT_OF:
            raise TypeError(f"k-th magnitude selection needs a 16/32/64-bit float dtype, got {dtype}")
        self.dtype = dtype
        self.bits = dtype.itemsize * 8
        self.shift = self.bits - DIGIT  # position of the digit this pass resolves
        self.prefix = 0  # the digits fixed so far
        self.numel = 0  # entries seen in the first pass
        self._below = 0  # entries whose magnitude is below every one matching the prefix
        self.histogram = torch.zeros(1 << DIGIT, dtype=torch.int64)

    @property
    def done(self) -> bool:
        return self.shift < 0

    def add(self, values: Tensor) -> None:
        """Count ``values`` (of ``dtype``) into this pass's histogram."""
        if self.done:
            raise RuntimeError("all digits are resolved; read value")
        if values.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} values, got {values.dtype}")
        if self.shift == self.bits - DIGIT:
            self.numel += values.numel()
        bits = values.detach().reshape(-1).abs().view(INT_OF[self.dtype.itemsize])
        bits = bits.to(torch.int64 if self.bits == 64 else torch.int32)
        high = self.shift + DIGIT
        if high < self.bits:
            bits = bits[(bits >> high) == self.prefix]
        digits = (bits >> self.shift) & 0xFFFF
        self.histogram += torch.bincount(digits.cpu(), minlength=1 << DIGIT)

    def end_pass(self, k: int) -> None:
        """Fix this pass's digit as the one holding the ``k``-th smallest magnitude overall."""
        cumulative = self.histogram.cumsum(0)
        below = self._below
        if not 1 <= k - below <= int(cumulative[-1]):
            raise ValueError(f"rank {k} is outside the {self.numel} magnitudes seen (did a pass skip tensors?)")
        digit = int(torch.searchsorted(cumulative, k - below))
        self._below = below + (int(cumulative[digit - 1]) if digit else 0)
        self.prefix = (self.prefix << DIGIT) | digit
        self.shift -= DIGIT
        self.histogram.zero_()

    @property
    def value(self) -> Tensor:
        """The k-th smallest magnitude, a 0-dim tensor of ``dtype``."""
        if not self.done:
            raise RuntimeError(f"{-(self.shift // DIGIT)} more pass(es) needed")
        pattern = self.prefix - (1 << self.bits) if self.prefix >= 1 << (self.bits - 1) else self.prefix
        return torch.tensor(pattern, dtype=INT_OF[self.dtype.itemsize]).view(self.dtype)
