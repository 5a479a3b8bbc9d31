"""Keep fusion_bench 0.2.33 importable under transformers 5.

transformers 5 removed ``CLIPVisionTransformer``: ``CLIPVisionModel`` now holds the embeddings and
encoder itself. fusion_bench's CLIP taskpool only imports the name for isinstance checks and type
hints, and assigns whole vision models to ``CLIPModel.vision_model``, which in transformers 5 is a
``CLIPVisionModel``. Aliasing the old name to ``CLIPVisionModel`` therefore restores the import
without changing behaviour.
"""

from __future__ import annotations


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
