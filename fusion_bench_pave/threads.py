"""Holding torch's intra-op thread count fixed for a block of work.

Results of some CPU kernels depend on the number of threads that split them: MKL's GEMM and SVD
kernels give other bits at 1 and 2 threads where MKL runs its AVX2 code (AMD EPYC; on Intel with
``MKL_ENABLE_INSTRUCTIONS=AVX2``). Work that must be bit-reproducible whatever the caller's thread
count (the tiny test zoos' training) pins it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def fixed_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` (which sets OpenMP's and MKL's pools too),
    then restore the caller's count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
