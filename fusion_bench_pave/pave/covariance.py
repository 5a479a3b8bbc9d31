"""Streaming input covariances of every linear layer (nn.Linear, transformers Conv1D, which read the
same [..., in] input): forward hooks accumulate X^T X and a token count.

Activations are never stored: each hook folds its batch into a running [in, in] sum. Linears that
consume the very same input tensor in one forward (q/k/v, gate/up, T5 cross-attention k/v) share one
sum, computed once. A Linear called on several tensors in one forward (DeBERTa's query/key
projections also read the relative-position embeddings; ALBERT reuses one layer) gets the sum over
all of them. The sums update only the lower triangle, one block row at a time (about half the flops
of X^T X as one GEMM), mirrored when the collector exits.

Padding tokens are dropped with a per-batch token mask [batch, seq], applied to inputs that are the
token stream ([batch, seq, d], or flattened to [batch * seq, d]). Every row counts for inputs that
are not: one row per sequence ([batch, d]: BERT's pooler and RoBERTa's classification head read the
first token, which is a real token with right padding) and inputs shared by the whole batch
([1, n, d]: DeBERTa's relative-position embeddings; with a batch of one, which cannot tell them from
tokens, only if it has no padding, as under dynamic padding). Any other shape is an error naming the
Linear.

With `attention`, the inputs of nn.MultiheadAttention's packed q/k/v projections and of its out_proj
are collected too (attention_layers: layers '<mha>.in_proj_q|k|v' and '<mha>.out_proj'); without it,
out_proj (which MHA never calls) is not hooked.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from fusion_bench_pave.attention_layers import IN_PROJ, attention_hooks, attention_modules, out_proj_names
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
    dict while collecting; statistics read from disk have a lazy mapping (io.safetensors.LazyTensors)."""

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
        attention: bool = False,
    ):
        self.model = model
        self.attention = attention
        self.include = include or (lambda name, module: True)
        self.dtype = dtype
        self.max_rows = max_rows
        self.stats = CovarianceStats()
        self._mask: Optional[Tensor] = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}  # this forward: id(input) -> its key
        self._calls: dict[str, list[str]] = {}  # this forward: Linear -> keys of the inputs it read
        self._inputs: dict[str, tuple[str, ...]] = {}  # Linear -> keys of its inputs in every forward
        self._handles: list = []

    def __enter__(self) -> "CovarianceCollector":
        out_projs = out_proj_names(self.model)
        for name, module in self.model.named_modules():
            if is_linear(module) and self.include(name, module) and (self.attention or name not in out_projs):
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        for name, mha in attention_modules(self.model).items() if self.attention else ():
            layers = [f"{name}.in_proj_{part}" for part in IN_PROJ]
            hooks = {layer: self._make_hook(layer) for layer in layers if self.include(layer, mha)}
            self._handles += attention_hooks(name, mha, hooks, self.include(f"{name}.out_proj", mha.out_proj))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
        if exc[0] is not None:  # the statistics are discarded; let the original error through
            return
        self._end_forward()
        self._combine_inputs()
        for xtx in self.stats.xtx.values():  # each sum holds its lower triangle until here
            symmetrize_(xtx)

    def set_token_mask(self, mask: Optional[Tensor]) -> None:
        """Start a new forward; `mask` (bool, [batch, seq]) marks the tokens to count, None = all."""
        self._end_forward()
        self._mask = None if mask is None else mask.bool()
        self._seen.clear()

    @property
    def full(self) -> bool:
        """True once every input seen so far has `max_rows` rows (never without a cap)."""
        counts = self.stats.count.values()
        return self.max_rows is not None and bool(counts) and min(counts) >= self.max_rows

    def _rows(self, name: str, x: Tensor) -> Tensor:
        """The rows of input `x` of Linear `name` that count (see the module docstring)."""
        rows = x.reshape(-1, x.shape[-1])
        mask = self._mask
        if mask is None:
            return rows
        if rows.shape[0] == mask.numel():  # the token stream
            return rows[mask.reshape(-1)]
        batch = mask.shape[0]
        per_sequence = x.dim() == 2 and x.shape[0] == batch
        shared = x.shape[0] == 1 and (batch > 1 or bool(mask.all()))  # a batch of one: only if unpadded
        if per_sequence or shared:
            return rows
        raise ValueError(
            f"Linear '{name}' received input of shape {tuple(x.shape)}, which is neither the token stream "
            f"(mask {tuple(mask.shape)}), one row per sequence ([{batch}, d]) nor shared by the batch "
            "([1, n, d]), so its padding rows cannot be told apart; disable padding masking "
            "(mask_padding=false) or exclude this Linear (exclude_modules)."
        )

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0]
            calls = self._calls.setdefault(name, [])
            seen = self._seen.get(id(x))
            if seen is not None and seen[0]() is x:
                key = seen[1]
            else:
                key = name if not calls else f"{name}#{len(calls)}"
                rows = self._rows(name, x.detach())
                if self.max_rows is not None:
                    rows = rows[: max(0, self.max_rows - self.stats.count.get(key, 0))]
                rows = rows.to(self.dtype)
                if key not in self.stats.xtx:
                    self.stats.xtx[key] = rows.new_zeros(rows.shape[1], rows.shape[1])
                add_gram_(self.stats.xtx[key], rows)
                self.stats.count[key] = self.stats.count.get(key, 0) + rows.shape[0]
                self._seen[id(x)] = (weakref.ref(x), key)
            calls.append(key)

        return hook

    def _end_forward(self) -> None:
        """Check that every Linear read the same inputs as in the first forward."""
        for name, keys in self._calls.items():
            previous = self._inputs.setdefault(name, tuple(keys))
            if previous != tuple(keys):
                raise RuntimeError(
                    f"Linear '{name}' read the inputs {list(previous)} in one batch and {keys} in another; "
                    "covariance sharing must be stable across batches."
                )
        self._calls.clear()

    def _combine_inputs(self) -> None:
        """Point each Linear at one sum: its single input's, or a new sum over its several inputs
        (keys joined by '+'); sums no Linear reads alone are dropped."""
        xtx, count = self.stats.xtx, self.stats.count
        for name, keys in self._inputs.items():
            key = keys[0] if len(keys) == 1 else "+".join(keys)
            if key not in xtx:
                xtx[key] = xtx[keys[0]].clone()
                for part in keys[1:]:
                    xtx[key] += xtx[part]
                count[key] = sum(count[k] for k in keys)
            self.stats.input_of[name] = key
        for key in set(xtx) - set(self.stats.input_of.values()):
            del xtx[key], count[key]


@torch.no_grad()
def collect_covariance(
    model: nn.Module,
    batches: Iterable[tuple[dict | tuple, Optional[Tensor]]],
    include: Optional[LinearFilter] = None,
    dtype: torch.dtype = torch.float64,
    max_rows: Optional[int] = None,
    attention: bool = False,
) -> CovarianceStats:
    """Run `model(**inputs)` (`model(*inputs)` for a tuple) on every (inputs, token_mask) batch and
    return the input statistics. With `max_rows`, each input keeps its first max_rows rows and the
    loop stops once all have them; with `attention`, nn.MultiheadAttention's too (module docstring)."""
    was_training = model.training
    model.eval()
    try:
        with CovarianceCollector(model, include, dtype, max_rows, attention) as collector:
            for inputs, mask in batches:
                collector.set_token_mask(mask)
                if isinstance(inputs, tuple):
                    model(*inputs)
                else:
                    model(**inputs)
                if collector.full:
                    break
    finally:
        model.train(was_training)
    return collector.stats
