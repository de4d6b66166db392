"""CLIP ViT image encoders: layouts and their conversion, architecture, matrices, saving.

Everything specific to CLIP ViTs is in this sub-package; the rest of the library reaches it
through :data:`CLIP_VIT`, the family's :class:`merging.families.base.ModelFamily`.
"""

from __future__ import annotations

from merging.families.clip_vit.family import CLIP_VIT, ClipViT

__all__ = ["CLIP_VIT", "ClipViT"]
