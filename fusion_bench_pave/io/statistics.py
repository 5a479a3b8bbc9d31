"""Covariance statistics as a safetensors file whose tensors are read back one at a time.

One tensor per distinct input (its X^T X sum, in the order collected); token counts, input sharing
and any caller metadata are JSON strings in the header's ``__metadata__``, beside the CRC-32 of
each tensor that ``LazyTensors`` checks on every read (io/safetensors.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import BinaryIO

from fusion_bench_pave.io.safetensors import CHECKSUMS, LazyTensors, write_tensors
from fusion_bench_pave.pave.covariance import CovarianceStats

FORMAT = "pave-covariance-stats/2"
RESERVED = ("format", "count", "input_of", CHECKSUMS)


def save_stats(handle: BinaryIO, stats: CovarianceStats, metadata: Mapping[str, str] | None = None) -> None:
    """Write `stats` (and extra string `metadata`) to an open binary handle."""
    extra = dict(metadata or {})
    if clash := set(extra) & set(RESERVED):
        raise ValueError(f"metadata keys {sorted(clash)} are reserved by the statistics file")
    header = {"format": FORMAT, "count": json.dumps(stats.count), "input_of": json.dumps(stats.input_of), **extra}
    write_tensors(handle, stats.xtx, header)


def load_stats(path: str | os.PathLike) -> tuple[CovarianceStats, dict[str, str]]:
    """Statistics whose `xtx` is a LazyTensors over `path` (every read checked), and the file's
    extra metadata. ValueError if the file is not a statistics file of this format."""
    tensors = LazyTensors(path)
    metadata = dict(tensors.metadata)
    if metadata.get("format") != FORMAT or not tensors.checked:
        tensors.close()
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r} (with checksums)")
    stats = CovarianceStats(
        xtx=tensors, count=json.loads(metadata.pop("count")), input_of=json.loads(metadata.pop("input_of"))
    )
    del metadata["format"]
    return stats, metadata
