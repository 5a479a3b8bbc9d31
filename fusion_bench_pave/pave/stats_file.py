"""CovarianceStats as a safetensors file whose tensors are read back one at a time.

One tensor per distinct input (its X^T X sum); token counts, input sharing and any caller metadata
are JSON strings in the header's ``__metadata__``. Writing streams each tensor's bytes straight into
an open handle (no serialised copy of the whole set, so it works inside ``atomic_file``); reading
keeps one file descriptor and fills a fresh tensor per ``__getitem__``, so only the covariances in
use occupy memory, and a file replaced or deleted on disk meanwhile does not change what is read.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import torch
from torch import Tensor

from fusion_bench_pave.pave.covariance import CovarianceStats

FORMAT = "pave-covariance-stats/1"
DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32"}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
RESERVED = ("format", "count", "input_of")


def write_tensors(handle: BinaryIO, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write `tensors` (float32/float64, CPU) and string `metadata` to `handle` in safetensors layout."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_CODES:
            raise TypeError(f"tensor '{name}' has dtype {tensor.dtype}; only {list(DTYPE_CODES)} are stored")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    handle.write(struct.pack("<Q", len(blob)) + blob)
    for tensor in tensors.values():
        handle.write(raw_bytes(tensor.detach().cpu().contiguous()))


def raw_bytes(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared (no copy)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class LazyTensors(Mapping[str, Tensor]):
    """Read-only mapping over a safetensors file (float32/float64 tensors); each lookup reads that
    one tensor from disk into new memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb", buffering=0)
        self._finalizer = weakref.finalize(self, self._file.close)
        try:
            self.metadata, self._entries, self._start = self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], int]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8 or (length := struct.unpack("<Q", prefix)[0]) > size - 8:
            raise ValueError(f"{self.path}: not a safetensors file (truncated header)")
        header = json.loads(self._file.read(length))
        metadata = header.pop("__metadata__", None) or {}
        entries, end = {}, 0
        for name, entry in header.items():
            if entry["dtype"] not in CODE_DTYPES:
                raise ValueError(f"{self.path}: tensor '{name}' has dtype {entry['dtype']}; expected one of {list(CODE_DTYPES)}")
            dtype, shape = CODE_DTYPES[entry["dtype"]], tuple(entry["shape"])
            begin, stop = entry["data_offsets"]
            if stop - begin != torch.Size(shape).numel() * dtype.itemsize:
                raise ValueError(f"{self.path}: tensor '{name}' has {stop - begin} bytes for shape {shape}")
            entries[name] = (dtype, shape, begin, stop)
            end = max(end, stop)
        if 8 + length + end != size:
            raise ValueError(f"{self.path}: {size} bytes on disk, the header describes {8 + length + end} (truncated?)")
        return metadata, entries, 8 + length

    def __getitem__(self, name: str) -> Tensor:
        dtype, shape, begin, stop = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        view = raw_bytes(out)
        filled = 0
        while filled < stop - begin:
            self._file.seek(self._start + begin + filled)
            read = self._file.readinto(view[filled:])
            if not read:
                raise OSError(f"{self.path}: file ended inside tensor '{name}'")
            filled += read
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors, without reading them."""
        return sum(stop - begin for _, _, begin, stop in self._entries.values())

    def close(self) -> None:
        """Release the file; later lookups fail."""
        self._finalizer()


def save_stats(handle: BinaryIO, stats: CovarianceStats, metadata: Mapping[str, str] | None = None) -> None:
    """Write `stats` (and extra string `metadata`) to an open binary handle."""
    extra = dict(metadata or {})
    if clash := set(extra) & set(RESERVED):
        raise ValueError(f"metadata keys {sorted(clash)} are reserved by the statistics file")
    header = {"format": FORMAT, "count": json.dumps(stats.count), "input_of": json.dumps(stats.input_of), **extra}
    write_tensors(handle, stats.xtx, header)


def load_stats(path: str | os.PathLike) -> tuple[CovarianceStats, dict[str, str]]:
    """Statistics whose `xtx` is a LazyTensors over `path`, and the file's extra metadata.
    ValueError if the file is not a statistics file of this format."""
    tensors = LazyTensors(path)
    metadata = dict(tensors.metadata)
    if metadata.get("format") != FORMAT:
        tensors.close()
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    stats = CovarianceStats(
        xtx=tensors, count=json.loads(metadata.pop("count")), input_of=json.loads(metadata.pop("input_of"))
    )
    del metadata["format"]
    return stats, metadata
