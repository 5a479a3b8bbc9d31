"""DARE's random drop of task-vector entries, with the random stream under the caller's control.

FusionBench draws one ``rand_like`` per dropped tensor from torch's global generator, task after task,
tensor after tensor. Passing a generator that has drawn the same shapes and dtypes before
(``skip_draws``) reproduces those masks exactly, in any order of tensors and tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

SKIP_CHUNK = 1 << 22  # entries drawn per step when advancing a generator


def random_drop(vector: Tensor, sparsity: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """Zero each entry with probability ``sparsity`` (uniform draw <= sparsity), then divide by
    1 - sparsity if ``rescale``."""
    if not 0 <= sparsity <= 1:
        raise ValueError(f"DARE sparsity must be in [0, 1], got {sparsity}")
    keep = torch.rand(vector.shape, generator=generator, dtype=vector.dtype, device=vector.device) > sparsity
    dropped = vector * keep
    return dropped / (1 - sparsity) if rescale else dropped


def task_generator_states(draws: Sequence[tuple[int, torch.dtype]], seed: int, num_tasks: int) -> list[Tensor]:
    """Task t's generator state: seeded, then past the ``draws`` of tasks 0..t-1 (FusionBench drops
    task after task from one global generator)."""
    generator = torch.Generator().manual_seed(seed)
    states = [generator.get_state()]
    for _ in range(num_tasks - 1):
        skip_draws(generator, draws)
        states.append(generator.get_state())
    return states


def skip_draws(generator: torch.Generator, draws: Iterable[tuple[int, torch.dtype]]) -> None:
    """Advance ``generator`` past uniform draws of (numel, dtype), as ``random_drop`` would make them
    (a serial CPU generator: the same count of the same dtype consumes the same stream), in chunks."""
    for numel, dtype in draws:
        buffer = torch.empty(min(numel, SKIP_CHUNK), dtype=dtype)
        for start in range(0, numel, SKIP_CHUNK):
            buffer[: min(SKIP_CHUNK, numel - start)].uniform_(generator=generator)
