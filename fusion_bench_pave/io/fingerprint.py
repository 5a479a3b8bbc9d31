"""Stable names for contents: the hash of a state dict's tensors and of JSON-able key parts, used by
PAVE's covariance cache, the calibration preprocessor and the record of a saved SMILE model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fusion_bench_pave.io.safetensors import host, raw_bytes


def fingerprint_state_dict(state_dict: Mapping[str, Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        tensor = host(state_dict[name])
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(raw_bytes(tensor))
    return digest.hexdigest()


def canonical(parts: Mapping[str, Any]) -> Any:
    """The key parts as they read back from JSON (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(dict(parts), sort_keys=True, default=str))


def cache_key(parts: Mapping[str, Any]) -> str:
    """Stable hash of the JSON-serialisable key parts."""
    blob = json.dumps(dict(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
