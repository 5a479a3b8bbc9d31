"""On-disk cache of covariance statistics keyed by (model fingerprint, dataset, samples, masking, ...),
so a sweep over rho or lambda collects statistics once. Writes are atomic (fusion_bench_pave.atomic)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from fusion_bench_pave.atomic import atomic_file
from fusion_bench_pave.pave.covariance import CovarianceStats

log = logging.getLogger(__name__)


def fingerprint_state_dict(state_dict: Mapping[str, Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(parts: Mapping[str, Any]) -> str:
    """Stable hash of the JSON-serialisable key parts."""
    blob = json.dumps(dict(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class CovarianceCache:
    """Directory of `<key>.pt` files holding CovarianceStats and the key parts they were made from."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"pave_cov_{key}.pt"

    def load(self, parts: Mapping[str, Any]) -> Optional[CovarianceStats]:
        """Cached statistics for these key parts, or None."""
        path = self.path(cache_key(parts))
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated/corrupt file (e.g. written by another tool): recompute
            log.warning(f"ignoring unreadable covariance cache {path}: {error}")
            return None
        if payload["parts"] != json.loads(json.dumps(dict(parts), sort_keys=True, default=str)):
            log.warning(f"ignoring covariance cache {path}: key parts differ (hash collision?)")
            return None
        log.info(f"covariance cache hit: {path}")
        return CovarianceStats(xtx=payload["xtx"], count=payload["count"], input_of=payload["input_of"])

    def save(self, parts: Mapping[str, Any], stats: CovarianceStats) -> Path:
        """Write atomically: a reader sees the old file, the new file, or nothing; never half a file."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(cache_key(parts))
        payload = {
            "parts": json.loads(json.dumps(dict(parts), sort_keys=True, default=str)),
            "xtx": stats.xtx,
            "count": stats.count,
            "input_of": stats.input_of,
        }
        with atomic_file(path, "wb") as handle:
            torch.save(payload, handle)
        return path
