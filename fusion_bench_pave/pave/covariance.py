"""Streaming input covariances of every linear layer (nn.Linear, transformers Conv1D, which read the
same [..., in] input): forward hooks accumulate X^T X and a token count.

Activations are never stored: each hook folds its batch into a running [in, in] sum. Linears that
consume the very same input tensor in one forward (q/k/v, gate/up, T5 cross-attention k/v) share one
sum, computed once. Padding tokens are dropped with a per-batch token mask. The sums update only
the lower triangle, one block row at a time (about half the flops of X^T X as one GEMM), mirrored
when the collector exits.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from fusion_bench_pave.linear_layers import is_linear

LinearFilter = Callable[[str, nn.Module], bool]
BLOCK = 256  # rows per block of the lower-triangle updates


def add_gram_(acc: Tensor, rows: Tensor, block: int = BLOCK) -> None:
    """acc += rows^T rows on the block lower triangle of acc (whole diagonal blocks, nothing right of
    them; mirror with `symmetrize_`): 53% of the full product's flops at d = 4096. Plain GEMMs in
    torch's own BLAS and thread pool, on any device. (SciPy's syrk took half the flops, but its
    OpenBLAS threads spun against torch's OpenMP threads: with 2 threads on 2 cores the PAVE run at
    MiniLM width took 4.3 s instead of 2.0 s.)"""
    size = acc.shape[0]
    for start in range(0, size, block):
        stop = min(start + block, size)
        acc[start:stop, :stop].addmm_(rows[:, start:stop].T, rows[:, :stop])


def symmetrize_(acc: Tensor, block: int = 1024) -> Tensor:
    """Copy the lower triangle of a square matrix onto its upper triangle, in place, one block of
    rows at a time (no full-size temporary)."""
    for start in range(0, acc.shape[0], block):
        stop = min(start + block, acc.shape[0])
        diagonal = acc[start:stop, start:stop]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
        acc[start:stop, stop:] = acc[stop:, start:stop].T
    return acc


@dataclass
class CovarianceStats:
    """Sums of X^T X per distinct input, token counts, and which input each Linear reads. `xtx` is a
    dict while collecting; statistics read from disk have a lazy mapping (stats_file.LazyTensors)."""

    xtx: Mapping[str, Tensor] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    input_of: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """Names of the Linear modules whose forward ran."""
        return list(self.input_of)

    def covariance(self, layer: str) -> Tensor:
        """Uncentred covariance C = X^T X / N of the input of `layer`."""
        key = self.input_of[layer]
        return self.xtx[key] / self.count[key]

    def to(self, device: torch.device | str) -> "CovarianceStats":
        """The statistics with every sum on `device` (self if they are all there already)."""
        if all(xtx.device == torch.device(device) for xtx in self.xtx.values()):
            return self
        xtx = {k: v.to(device) for k, v in self.xtx.items()}
        return CovarianceStats(xtx=xtx, count=dict(self.count), input_of=dict(self.input_of))

    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> "CovarianceStats":
        """Sum the statistics over processes with `reduce_sum` (e.g. a gloo all-reduce)."""
        keys = sorted(self.xtx)
        xtx = {k: reduce_sum(self.xtx[k]) for k in keys}
        counts = reduce_sum(torch.tensor([self.count[k] for k in keys], dtype=torch.float64))
        count = {k: int(round(c)) for k, c in zip(keys, counts.tolist())}
        return CovarianceStats(xtx=xtx, count=count, input_of=dict(self.input_of))


class CovarianceCollector:
    """Context manager hooking the linear layers of `model`; call `set_token_mask` before each forward."""

    def __init__(
        self,
        model: nn.Module,
        include: Optional[LinearFilter] = None,
        dtype: torch.dtype = torch.float64,
        max_rows: Optional[int] = None,
    ):
        self.model = model
        self.include = include or (lambda name, module: True)
        self.dtype = dtype
        self.max_rows = max_rows
        self.stats = CovarianceStats()
        self._mask: Optional[Tensor] = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list = []

    def __enter__(self) -> "CovarianceCollector":
        for name, module in self.model.named_modules():
            if is_linear(module) and self.include(name, module):
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
        for xtx in self.stats.xtx.values():  # each sum holds its lower triangle until here
            symmetrize_(xtx)

    def set_token_mask(self, mask: Optional[Tensor]) -> None:
        """Start a new forward; `mask` (bool, [batch, seq]) marks the tokens to count, None = all."""
        self._mask = None if mask is None else mask.bool()
        self._seen.clear()

    @property
    def full(self) -> bool:
        """True once every input seen so far has `max_rows` rows (never without a cap)."""
        counts = self.stats.count.values()
        return self.max_rows is not None and bool(counts) and min(counts) >= self.max_rows

    def _rows(self, name: str, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self._mask is None:
            return rows
        if self._mask.numel() != rows.shape[0]:
            raise ValueError(
                f"Linear '{name}' received {rows.shape[0]} tokens (input shape {tuple(x.shape)}) but the "
                f"attention mask covers {self._mask.numel()}; this architecture reshapes tokens, so "
                "disable padding masking (mask_padding=false) for it."
            )
        return rows[self._mask.reshape(-1)]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0]() is x:
                source = seen[1]
            else:
                source = name
                rows = self._rows(name, x.detach())
                if self.max_rows is not None:
                    rows = rows[: max(0, self.max_rows - self.stats.count.get(name, 0))]
                rows = rows.to(self.dtype)
                if name not in self.stats.xtx:
                    self.stats.xtx[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
                add_gram_(self.stats.xtx[name], rows)
                self.stats.count[name] = self.stats.count.get(name, 0) + rows.shape[0]
                self._seen[id(x)] = (weakref.ref(x), name)
            previous = self.stats.input_of.setdefault(name, source)
            if previous != source:
                raise RuntimeError(
                    f"Linear '{name}' shared its input with '{previous}' in one batch and with "
                    f"'{source}' in another; covariance sharing must be stable across batches."
                )

        return hook


@torch.no_grad()
def collect_covariance(
    model: nn.Module,
    batches: Iterable[tuple[dict, Optional[Tensor]]],
    include: Optional[LinearFilter] = None,
    dtype: torch.dtype = torch.float64,
    max_rows: Optional[int] = None,
) -> CovarianceStats:
    """Run `model(**inputs)` on every (inputs, token_mask) batch and return the input statistics.
    With `max_rows`, each input keeps its first max_rows rows and the loop stops once all have them."""
    was_training = model.training
    model.eval()
    try:
        with CovarianceCollector(model, include, dtype, max_rows) as collector:
            for inputs, mask in batches:
                collector.set_token_mask(mask)
                model(**inputs)
                if collector.full:
                    break
    finally:
        model.train(was_training)
    return collector.stats
