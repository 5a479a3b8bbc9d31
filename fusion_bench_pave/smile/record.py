"""What a saved SMILE model was built from, stored beside its weights so ``model_path`` is reused
only for the same request.

``smile_upscaling.json`` holds the upscaling settings and a content fingerprint (names, dtypes,
shapes and bytes of every tensor; the one PAVE's covariance cache keys on) of each input model, in
pool order (expert i is model i). Reusing a directory whose record differs, or that has none (saved
by an older version), is refused with the differences and what to do: never a silent reuse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from fusion_bench_pave.io.fingerprint import canonical, fingerprint_state_dict

RECORD = "smile_upscaling.json"
FORMAT = "fusion_bench_pave.smile.record/1"


def upscaling_record(settings: Mapping[str, Any], inputs: Mapping[str, Mapping[str, Tensor]]) -> dict:
    """The record of an upscaling: JSON-normalised ``settings`` and the fingerprint of every input
    model (``"_pretrained_"`` first, then the fine-tuned ones in expert order) as ``[name, hash]`` pairs."""
    return {
        "format": FORMAT,
        "settings": canonical(settings),
        "inputs": [[name, fingerprint_state_dict(tensors)] for name, tensors in inputs.items()],
    }


def record_text(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2)


def write_record(directory: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write ``record`` into ``directory`` (the staging directory of an atomic save)."""
    (Path(directory) / RECORD).write_text(record_text(record))


def check_record(path: str | os.PathLike, requested: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless the SMILE model saved at ``path`` was built from exactly ``requested``."""
    path = Path(path)
    remedy = f"refusing to reuse it: choose a new model_path, or delete {path} to upscale again"
    try:
        saved = json.loads((path / RECORD).read_text())
    except FileNotFoundError:
        raise ValueError(
            f"model_path {path} holds no {RECORD} (a SMILE model saved by an older version, or not one at all), "
            f"so it cannot be matched with the requested settings and models; {remedy}"
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"model_path {path}: unreadable {RECORD} ({error}); {remedy}") from error
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"model_path {path}: {RECORD} is not a {FORMAT} record; {remedy}")
    differences = _setting_differences(saved.get("settings", {}), requested["settings"])
    differences += _input_differences(saved.get("inputs", []), requested["inputs"])
    if differences:
        raise ValueError(f"model_path {path} holds a SMILE model built differently ({'; '.join(differences)}); {remedy}")


def _setting_differences(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    keys = list(requested) + [key for key in saved if key not in requested]
    return [
        f"{key}: saved {saved.get(key, '(unset)')!r}, requested {requested.get(key, '(unset)')!r}"
        for key in keys if saved.get(key) != requested.get(key)
    ]


def _input_differences(saved: list, requested: list) -> list[str]:
    saved_names, requested_names = [name for name, _ in saved], [name for name, _ in requested]
    if saved_names != requested_names:
        return [f"models: saved {saved_names}, requested {requested_names}"]
    return [
        f"model {name!r}: its weights differ from those the saved model was built from"
        for (name, old), (_, new) in zip(saved, requested) if old != new
    ]
