"""transformers 5 removed CLIPVisionTransformer; fusion_bench 0.2.33's CLIP taskpool imports it."""

from __future__ import annotations

import subprocess
import sys

import transformers
from transformers import CLIPVisionModel
from transformers.models.clip import modeling_clip

from fusion_bench_pave.compat import patch_transformers_for_fusion_bench, patch_typing_override


def test_alias_present_after_import_and_patch_is_idempotent():
    import fusion_bench_pave.plugin  # noqa: F401  (compat repair, resolvers, Auto classes)

    assert hasattr(modeling_clip, "CLIPVisionTransformer")
    assert patch_transformers_for_fusion_bench() is False  # already there: nothing to do
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert modeling_clip.CLIPVisionTransformer is CLIPVisionModel


def test_clip_taskpool_imports_in_a_fresh_interpreter():
    code = "import fusion_bench_pave.plugin; from fusion_bench.taskpool import CLIPVisionModelTaskPool; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_typing_override_exists_after_import_and_patch_is_idempotent():
    """fusion_bench 0.2.33's OpenCLIP pool imports typing.override (Python 3.12+)."""
    import typing

    import typing_extensions

    import fusion_bench_pave.plugin  # noqa: F401

    assert callable(typing.override)
    assert patch_typing_override() is False  # already there: nothing to do
    if sys.version_info < (3, 12):
        assert typing.override is typing_extensions.override

    @typing.override
    def method() -> None: ...

    assert method.__override__ is True
