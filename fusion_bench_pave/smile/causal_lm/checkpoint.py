"""Tensor-by-tensor safetensors I/O for checkpoints that must never be fully in memory.

``SafetensorsCheckpoint`` is a lazy mapping over a Hugging Face checkpoint directory (single
file or sharded with an index); every read opens the shard, copies out one tensor and closes it,
so no mmap stays resident. ``ShardWriter`` buffers output tensors up to ``max_shard_bytes`` and
writes numbered shards plus the standard index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
# safetensors header dtype -> torch dtype
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# the files beside the weights that a merged or upscaled model keeps: tokenizer and generation settings
TOKENIZER_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|.*\.model|vocab\..*|merges\.txt|chat_template\..*)")


def open_safetensors(file: Path):
    """``safe_open(file)``, failing with the file's name if it is corrupt or truncated."""
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({error}); re-create or re-download the checkpoint") from error


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """Read-only ``name -> tensor`` view of the safetensors weights in ``path`` (loaded on access)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no *.safetensors weights (or {INDEX}) found")
            self._files = {}
            for file in files:
                with open_safetensors(file) as f:
                    self._files |= dict.fromkeys(f.keys(), file)

    def __getitem__(self, name: str) -> torch.Tensor:
        with open_safetensors(self._files[name]) as f:
            return f.get_tensor(name)

    def spec(self, name: str) -> tuple[torch.Size, torch.dtype]:
        """Shape and dtype of tensor ``name``, from the file's header (no data read)."""
        with open_safetensors(self._files[name]) as f:
            piece = f.get_slice(name)
            return torch.Size(piece.get_shape()), DTYPES[piece.get_dtype()]

    def __contains__(self, name: object) -> bool:  # without loading the tensor (Mapping's default would)
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class ShardWriter:
    """Write tensors to ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ~``max_shard_bytes``."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 2**30) -> None:
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = self.out_dir / f"shard-{len(self._shards):05d}.partial"
        save_file(self._buffer, str(file), metadata={"format": "pt"})
        self._shards.append((file, list(self._buffer)))
        self._buffer, self._bytes = {}, 0

    def close(self) -> None:
        """Flush the last shard, give the shards their final names and write the index if sharded."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (file, names) in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(file, self.out_dir / final)
            weight_map |= dict.fromkeys(names, final)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))


def copy_tokenizer_files(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the tokenizer and generation files of the model directory ``source`` into ``target``."""
    for file in Path(source).iterdir():
        if file.is_file() and TOKENIZER_FILES.fullmatch(file.name) and file.name != INDEX:
            shutil.copy2(file, Path(target) / file.name)
