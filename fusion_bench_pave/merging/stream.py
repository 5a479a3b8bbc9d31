"""Task-vector merges streamed one tensor at a time, in as many passes as the method needs.

A ``MergePlan`` says which tensors to merge, in which order, how often each counts in the whole-model
vector (tied weights count once per state-dict name, as FusionBench flattens state dicts), and which
ones DARE drops from. ``TaskVectorStream`` yields, tensor by tensor, the task vectors theta_t - theta_pre,
DARE-dropped and then passed through an optional per-tensor transform (where PAVE's purification goes),
and restarts identically for every pass. Task Arithmetic needs one pass; TIES needs one per 16-bit
digit of the dtype to find each task's exact magnitude threshold (``kth_magnitude``), one to count
the sign votes, and one to merge. Only one tensor's pretrained, fine-tuned and task-vector copies are
in memory at a time.

Several processes can share a merge (``Share``): each reads its own tensors in TIES's whole-model
passes and the integer counts those passes make (magnitude histograms, sign votes) are summed over
the processes, so the thresholds and the majority sign are exactly those of one process; each then
merges the tensors it writes (``take``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fusion_bench_pave.merging.dare import random_drop, skip_draws, task_generator_states
from fusion_bench_pave.merging.kth_magnitude import KthMagnitude
from fusion_bench_pave.merging.task_arithmetic import task_arithmetic
from fusion_bench_pave.merging.ties import MERGE_FUNCS, MergeFunc, keep_fraction, majority_sign, sign_votes, ties_merge, trim, trim_rank

#: (tensor name, pretrained tensor, task vectors) -> task vectors; must be deterministic (runs every pass)
TaskVectorTransform = Callable[[str, Tensor, list[Tensor]], list[Tensor]]


@dataclass(frozen=True)
class TaskArithmetic:
    """theta_pre + scaling_factor * sum of task vectors (FusionBench's ``TaskArithmeticAlgorithm``)."""

    scaling_factor: float


@dataclass(frozen=True)
class Ties:
    """TIES-Merging with FusionBench's ``TiesMergingAlgorithm`` parameters (``threshold``: fraction, or
    percentage if above 1, of each task's entries kept, by magnitude over the whole model)."""

    scaling_factor: float
    threshold: float
    merge_func: MergeFunc = "sum"

    def __post_init__(self) -> None:
        if self.merge_func not in MERGE_FUNCS:
            raise ValueError(f"unknown TIES merge_func {self.merge_func!r}; choose one of {MERGE_FUNCS}")
        if not 0 <= keep_fraction(self.threshold) < 1:
            raise ValueError(f"TIES threshold {self.threshold} must keep a fraction in [0, 1) of each task's "
                             "entries: a fraction below 1 or a percentage below 100")


@dataclass(frozen=True)
class Dare:
    """DARE's random drop of task-vector entries, with FusionBench's ``DareTiesMerging`` parameters
    (``only_on_linear_weights``: drop from the weights of nn.Linear modules only, else from every
    parameter; the plan's ``drawn`` lists them), drawn from a CPU generator seeded with ``seed`` (as
    FusionBench draws from torch's global generator after ``torch.manual_seed(seed)``)."""

    sparsity_ratio: float
    rescale: bool = True
    only_on_linear_weights: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity_ratio <= 1:
            raise ValueError(f"DARE sparsity_ratio must be in [0, 1], got {self.sparsity_ratio}")


@dataclass(frozen=True)
class MergePlan:
    """``order``: the tensor names, in processing order (DARE's draws first, in their order);
    ``multiplicity``: name -> how many state-dict entries hold it; ``drawn``: names DARE drops from."""

    order: tuple[str, ...]
    multiplicity: Mapping[str, int]
    drawn: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Share:
    """One process's part of a merge run by several. ``owns(name)``: whether this process reads the
    tensor in TIES's whole-model passes (the processes' sets partition the plan); ``total(compute,
    what)``: this process's integer counts ``compute()`` summed over the processes (exact), raising on
    every process if ``compute`` failed on any."""

    owns: Callable[[str], bool]
    total: Callable[[Callable[[], Tensor], str], Tensor]


#: a merge run by one process
ALONE = Share(lambda name: True, lambda compute, what: compute())


def tensor_spec(tensors: Mapping[str, Tensor], name: str) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of ``tensors[name]``, from the file header when the mapping offers ``spec``."""
    if hasattr(tensors, "spec"):
        return tensors.spec(name)
    tensor = tensors[name]
    return tensor.shape, tensor.dtype


def plan_draws(plan: MergePlan, specs: Mapping[str, tuple[torch.Size, torch.dtype]]) -> list[tuple[int, torch.dtype]]:
    """(numel, dtype) of each uniform draw DARE makes for one task, in the plan's order."""
    return [(specs[name][0].numel(), specs[name][1]) for name in plan.order if name in plan.drawn]


def _describe(spec: tuple[torch.Size, torch.dtype]) -> str:
    return f"{list(spec[0])} {str(spec[1]).removeprefix('torch.')}"


class TaskVectorStream:
    """Per-tensor task vectors of ``finetuned`` against ``pretrained``, in ``plan.order``, identical in
    every pass. Validates names, shapes and dtypes of all checkpoints first (headers only)."""

    def __init__(self, pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], plan: MergePlan,
                 dare: Dare | None = None, transform: TaskVectorTransform | None = None,
                 labels: Sequence[str] | None = None) -> None:
        if not finetuned:
            raise ValueError("no fine-tuned models given; merging needs at least one")
        self.pretrained, self.finetuned, self.plan = pretrained, list(finetuned), plan
        self.dare, self.transform = dare, transform
        labels = list(labels or [f"fine-tuned model #{i}" for i in range(len(finetuned))])
        self.specs = {name: tensor_spec(pretrained, name) for name in plan.order}
        for name, (shape, dtype) in self.specs.items():
            if not dtype.is_floating_point:
                raise ValueError(f"{name}: dtype {dtype}; task-vector merging needs floating-point tensors")
        known = set(plan.order)
        for label, tensors in [("the pretrained model", pretrained), *zip(labels, self.finetuned)]:
            missing = [name for name in plan.order if name not in tensors]
            extra = [name for name in tensors if name not in known]
            if missing or extra:
                problems = [f"{what} {', '.join(names[:5])}" for what, names in (("missing", missing), ("unexpected", extra)) if names]
                raise ValueError(f"{label}: {'; '.join(problems)}; all models must have the tensors of the pretrained architecture")
            for name in plan.order if tensors is not pretrained else ():
                if (spec := tensor_spec(tensors, name)) != self.specs[name]:
                    raise ValueError(f"{label}: {name} is {_describe(spec)}, the pretrained one {_describe(self.specs[name])}; "
                                     "all models must have the pretrained architecture")
        self._states = [] if dare is None else task_generator_states(plan_draws(plan, self.specs), dare.seed, len(self.finetuned))

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {dtype for _, dtype in self.specs.values()}

    def vectors(self, desc: str, progress: bool = True, take: Callable[[str], bool] | None = None
                ) -> Iterator[tuple[str, Tensor, list[Tensor]]]:
        """One pass: (name, pretrained tensor, task vectors) for every tensor of the plan that ``take``
        (asked once per tensor, in order) accepts; the others are not read (DARE skips their draws)."""
        generators = [torch.Generator().set_state(state) for state in self._states]
        for name in tqdm(self.plan.order, desc=desc, disable=not progress, dynamic_ncols=True):
            if take is not None and not take(name):
                if self.dare is not None and name in self.plan.drawn:
                    for generator in generators:
                        skip_draws(generator, [(self.specs[name][0].numel(), self.specs[name][1])])
                continue
            pretrained = self.pretrained[name]
            vectors = []
            for t, tensors in enumerate(self.finetuned):
                vector = tensors[name] - pretrained
                if self.dare is not None and name in self.plan.drawn:
                    vector = random_drop(vector, self.dare.sparsity_ratio, self.dare.rescale, generators[t])
                vectors.append(vector)
            if self.transform is not None:
                vectors = self.transform(name, pretrained, vectors)
            yield name, pretrained, vectors


def ties_thresholds(stream: TaskVectorStream, threshold: float, progress: bool = True, share: Share = ALONE) -> Tensor:
    """Each task's magnitude threshold over the whole model ([T]): FusionBench's ``kthvalue`` over the
    flattened task vector, found exactly in one pass per 16-bit digit of the dtype (each process
    histograms its share of the tensors; the histograms are summed)."""
    if len(stream.dtypes) != 1:
        raise ValueError("TIES flattens the whole model into one vector; its tensors must share one dtype, "
                         f"found {sorted(map(str, stream.dtypes))}")
    (dtype,) = stream.dtypes
    multiplicity = stream.plan.multiplicity
    rank = trim_rank(sum(stream.specs[name][0].numel() * multiplicity[name] for name in stream.plan.order), threshold)
    selectors = [KthMagnitude(dtype) for _ in stream.finetuned]
    digits = dtype.itemsize // 2
    for digit in range(digits):
        def histograms(digit: int = digit) -> Tensor:
            for name, _, vectors in stream.vectors(f"TIES thresholds, pass {digit + 1}/{digits + 2}", progress, share.owns):
                for selector, vector in zip(selectors, vectors):
                    for _ in range(multiplicity[name]):
                        selector.add(vector)
            return torch.stack([selector.histogram for selector in selectors])

        for selector, histogram in zip(selectors, share.total(histograms, "TIES thresholds")):
            selector.histogram.copy_(histogram)
            selector.end_pass(rank)
    return torch.stack([selector.value for selector in selectors])


def merged_tensors(stream: TaskVectorStream, method: TaskArithmetic | Ties, progress: bool = True,
                   take: Callable[[str], bool] | None = None, share: Share = ALONE) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, merged tensor) for every tensor of the stream's plan that ``take`` accepts (asked
    once per tensor, in order; None: all), in its order; TIES's whole-model passes run on ``share``."""
    if isinstance(method, TaskArithmetic):
        for name, pretrained, vectors in stream.vectors("Task Arithmetic", progress, take):
            yield name, task_arithmetic(pretrained, vectors, method.scaling_factor)
        return
    thresholds = ties_thresholds(stream, method.threshold, progress, share)
    passes = thresholds.dtype.itemsize // 2 + 2

    def votes() -> Tensor:
        total = 0
        for name, _, vectors in stream.vectors(f"TIES sign votes, pass {passes - 1}/{passes}", progress, share.owns):
            total += sign_votes(trim(vectors, thresholds)) * stream.plan.multiplicity[name]
        return torch.tensor(total, dtype=torch.int64)

    majority = majority_sign(int(share.total(votes, "TIES sign votes")))
    for name, pretrained, vectors in stream.vectors(f"TIES merge, pass {passes}/{passes}", progress, take):
        yield name, ties_merge(pretrained, trim(vectors, thresholds), majority, method.scaling_factor, method.merge_func)
