"""Keep fusion_bench 0.2.33 importable under transformers 5 and on Python 3.11.

transformers 5 removed ``CLIPVisionTransformer``: ``CLIPVisionModel`` now holds the embeddings and
encoder itself. fusion_bench's CLIP taskpool only imports the name for isinstance checks and type
hints, and assigns whole vision models to ``CLIPModel.vision_model``, which in transformers 5 is a
``CLIPVisionModel``. Aliasing the old name to ``CLIPVisionModel`` therefore restores the import
without changing behaviour.

``typing.override`` is new in Python 3.12; fusion_bench's OpenCLIP pool (and its ResNet AdaMerging and
Bradley-Terry reward model) import it from ``typing``. ``typing_extensions.override`` is the same
decorator (it sets ``__override__`` and returns its argument), so on 3.11 it is put in its place.
"""

from __future__ import annotations

import typing


def patch_transformers_for_fusion_bench() -> bool:
    """Alias ``CLIPVisionTransformer`` where transformers lacks it. Returns True if it patched."""
    try:
        from transformers.models.clip import modeling_clip
    except ImportError:  # transformers not installed: nothing to repair
        return False
    if hasattr(modeling_clip, "CLIPVisionTransformer"):
        return False
    modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel
    return True


def patch_typing_override() -> bool:
    """Give ``typing`` the ``override`` decorator of Python 3.12 where it lacks it. Returns True if it patched."""
    if hasattr(typing, "override"):
        return False
    from typing_extensions import override

    typing.override = override
    return True
