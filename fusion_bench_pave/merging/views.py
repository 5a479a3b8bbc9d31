"""Read-only ``name -> tensor`` views of checkpoints that streamed merges read like checkpoints.

``DaredWeights``: a fine-tuned checkpoint after DARE on its raw deltas, theta_pre + drop(theta_ft -
theta_pre), as PAVE applies DARE before purifying (``pave.models.dare_``: the drop's generator seeded
once, task after task, tensor after tensor in the plan's order). ``Overlay``: a checkpoint with some
tensors replaced (PAVE's purified Linear weights over the fine-tuned checkpoint). ``Combined``:
checkpoints with disjoint names read as one (the purified weights each rank of a distributed run wrote).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from fusion_bench_pave.merging.dare import random_drop, skip_draws
from fusion_bench_pave.merging.stream import Dare, MergePlan, tensor_spec


class _View(Mapping[str, Tensor]):
    """A view with the names, shapes and dtypes of the checkpoint ``self.base``."""

    base: Mapping[str, Tensor]

    def spec(self, name: str) -> tuple[torch.Size, torch.dtype]:
        return tensor_spec(self.base, name)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class DaredWeights(_View):
    """``finetuned`` with DARE applied to the deltas of ``plan.drawn`` (``state``: this task's generator
    state before its first draw). Reads in the plan's order cost one draw per drawn tensor; reading an
    earlier tensor again restarts the generator (each pass of a merge restarts once)."""

    def __init__(self, pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], plan: MergePlan, dare: Dare,
                 state: Tensor) -> None:
        self.pretrained, self.base, self.dare, self.state = pretrained, finetuned, dare, state
        self.drawn = [name for name in plan.order if name in plan.drawn]
        self.index = {name: i for i, name in enumerate(self.drawn)}
        self.generator, self.position = torch.Generator().set_state(state), 0

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.index:
            return self.base[name]
        index = self.index[name]
        if index < self.position:
            self.generator, self.position = torch.Generator().set_state(self.state), 0
        skip_draws(self.generator, [self._draw(skipped) for skipped in self.drawn[self.position:index]])
        self.position = index + 1
        pretrained = self.pretrained[name]
        return pretrained + random_drop(self.base[name] - pretrained, self.dare.sparsity_ratio, self.dare.rescale,
                                        self.generator)

    def _draw(self, name: str) -> tuple[int, torch.dtype]:
        shape, dtype = tensor_spec(self.base, name)
        return shape.numel(), dtype


class Overlay(_View):
    """``base`` with the tensors of ``top`` in place of its own (``top`` may only replace, not add)."""

    def __init__(self, top: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> None:
        if extra := [name for name in top if name not in base]:
            raise ValueError(f"tensors {extra[:5]} replace nothing in the checkpoint they overlay")
        for name in top:
            if tensor_spec(top, name) != tensor_spec(base, name):
                raise ValueError(f"{name}: the replacement's shape and dtype differ from the checkpoint's")
        self.top, self.base = top, base

    def source(self, name: str) -> Mapping[str, Tensor]:
        return self.top if name in self.top else self.base

    def __getitem__(self, name: str) -> Tensor:
        return self.source(name)[name]

    def spec(self, name: str) -> tuple[torch.Size, torch.dtype]:
        return tensor_spec(self.source(name), name)


class Combined(Mapping[str, Tensor]):
    """The tensors of ``parts`` (disjoint names) as one mapping, in the parts' order."""

    def __init__(self, parts: list[Mapping[str, Tensor]]) -> None:
        self.parts = parts
        self._part: dict[str, Mapping[str, Tensor]] = {}
        for part in parts:
            for name in part:
                if name in self._part:
                    raise ValueError(f"tensor {name!r} is in two of the combined checkpoints")
                self._part[name] = part

    def __getitem__(self, name: str) -> Tensor:
        return self._part[name][name]

    def spec(self, name: str) -> tuple[torch.Size, torch.dtype]:
        return tensor_spec(self._part[name], name)

    def __contains__(self, name: object) -> bool:
        return name in self._part

    def __iter__(self) -> Iterator[str]:
        return iter(self._part)

    def __len__(self) -> int:
        return len(self._part)

    def close(self) -> None:
        """Close the parts that can be closed (``LazyTensors``)."""
        for part in self.parts:
            if hasattr(part, "close"):
                part.close()
