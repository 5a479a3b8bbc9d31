"""Model-pool mixin whose ``save_model`` is atomic and will not clobber an existing model.

FusionBench's program saves the merged model with ``modelpool.save_model(model, path, **merged_model_save_kwargs)``
after the merge, writing into ``path`` directly: a run killed while saving leaves a half-written
checkpoint, and a rerun silently overwrites the last one. Pools with this mixin write into a staging
directory renamed into place (``fusion_bench_pave.io.atomic``) and refuse an existing ``path`` unless
``merged_model_save_kwargs.overwrite=true``, and even then if it holds files we did not write there;
the refusal happens when the program attaches itself to the pool, i.e. before any merging, not after it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from fusion_bench_pave.io.atomic import atomic_output_dir, refuse_replacing_dir
from fusion_bench_pave.io.formats import model_format_for

log = logging.getLogger(__name__)


def program_save_target(program: Any) -> tuple[str, bool] | None:
    """(path, overwrite) the FusionBench program will save the merged model to, or None."""
    path = getattr(program, "merged_model_save_path", None)
    if path is None:
        return None
    log_dir = getattr(program, "log_dir", None)
    if "{log_dir}" in path and log_dir is not None:
        path = path.format(log_dir=log_dir)
    kwargs = getattr(program, "merged_model_save_kwargs", None) or {}
    return os.path.expanduser(path), bool(kwargs.get("overwrite", False))


class AtomicSaveMixin:
    """``save_model(model, path, overwrite=False, **kwargs)``: the base pool's save, written to a
    staging directory that replaces ``path`` only once complete (and only if it holds just what we
    wrote there). A model that a registered format claims (io/formats.py; e.g. a SMILE-upscaled model
    whose ``from_pretrained`` would ignore the experts) is written in that format."""

    _attached_program: Any = None

    @property
    def _program(self) -> Any:
        return self._attached_program

    @_program.setter
    def _program(self, program: Any) -> None:
        """FusionBench sets this right after instantiating the pool: check the save path now."""
        self._attached_program = program
        if (target := program_save_target(program)) is not None:
            refuse_replacing_dir(*target)

    def save_model(self, model: nn.Module, path: str, *args: Any, overwrite: bool = False, **kwargs: Any) -> None:
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported by atomic saving; save locally, then upload the directory")
        with atomic_output_dir(os.path.expanduser(path), overwrite) as staging:
            if (model_format := model_format_for(model)) is not None:
                log.warning(f"{path}: {model_format.note}")
                model_format.write(model, staging)
            else:
                super().save_model(model, str(staging), *args, **kwargs)
