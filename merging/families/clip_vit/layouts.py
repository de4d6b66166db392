"""Checkpoint layouts of a CLIP image encoder, detected from keys, and conversions.

The library works in one canonical layout: the keys of open_clip's ``VisionTransformer``
(``conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ``proj``, ...), because
evaluation runs through that module (open_clip's, or :mod:`merging.evaluation.clip_model`, which
has the same names). Checkpoints come in four layouts:

* ``open_clip``: a whole open_clip CLIP state dict, image tower under ``visual.``;
* ``open_clip_visual``: the image tower's own keys (the canonical layout itself);
* ``hf_clip``: a transformers ``CLIPModel`` (``vision_model.*``, ``text_model.*``,
  ``visual_projection``);
* ``hf_clip_vision``: a transformers ``CLIPVisionModel`` (``vision_model.*``; transformers 5
  saves it without the prefix), possibly with ``visual_projection`` (``...WithProjection``).

A conversion is a table of recipes (:class:`merging.families.base.Recipe`): each canonical
key is built from one or more source keys by copying, concatenating q/k/v, or transposing
the projection. The same recipes serve eager conversion of a state dict and lazy,
tensor-by-tensor reading of a file, and they give shapes without reading any data, so a
checkpoint can be checked from its header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Literal

from torch import Tensor

from merging.errors import CheckpointError
from merging.families.base import Recipe

HF_PREFIX = "vision_model."
HF_PROJECTION = "visual_projection.weight"
OPEN_CLIP_PREFIX = "visual."


class Layout(str, Enum):
    """Where a checkpoint's image-encoder weights live and how they are named."""

    OPEN_CLIP = "open_clip"
    OPEN_CLIP_VISUAL = "open_clip_visual"
    HF_CLIP = "hf_clip"
    HF_CLIP_VISION = "hf_clip_vision"

    @property
    def format(self) -> Literal["hf", "open_clip"]:
        """The output format that reproduces this layout: ``hf`` or ``open_clip``."""
        return "hf" if self in (Layout.HF_CLIP, Layout.HF_CLIP_VISION) else "open_clip"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Layout.OPEN_CLIP: "open_clip CLIP model (visual.* keys)",
    Layout.OPEN_CLIP_VISUAL: "open_clip VisionTransformer (image tower keys)",
    Layout.HF_CLIP: "Hugging Face CLIPModel (vision_model.*, text_model.*, visual_projection)",
    Layout.HF_CLIP_VISION: "Hugging Face CLIPVisionModel (vision_model.* keys)",
}


def detect_layout(keys: Iterable[str]) -> Layout:
    """Recognise the layout from parameter names alone; raise with a sample of keys if unknown."""
    keys = set(keys)
    layout = recognise_layout(keys)
    if layout is None:
        sample = ", ".join(sorted(keys)[:4]) or "no tensors at all"
        raise CheckpointError(f"unknown checkpoint layout: not a CLIP ViT image encoder (keys: {sample}, ...)")
    return layout


def recognise_layout(keys: Iterable[str]) -> Layout | None:
    """The layout of a CLIP ViT image encoder with these keys; None when they are not a CLIP's.

    An open_clip model whose image tower is not a ViT is a CLIP, but not one that can be
    merged here: it raises, saying so, rather than passing as "not a CLIP".
    """
    keys = set(keys)
    if f"{OPEN_CLIP_PREFIX}conv1.weight" in keys or any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        if f"{OPEN_CLIP_PREFIX}class_embedding" not in keys:
            raise CheckpointError(
                "open_clip checkpoint whose image tower is not a VisionTransformer "
                "(no visual.class_embedding; ResNet towers are not supported)"
            )
        return Layout.OPEN_CLIP
    if {"conv1.weight", "class_embedding"} <= keys and any(k.startswith("transformer.resblocks.") for k in keys):
        return Layout.OPEN_CLIP_VISUAL
    if f"{HF_PREFIX}embeddings.patch_embedding.weight" in keys:
        return Layout.HF_CLIP if any(k.startswith("text_model.") for k in keys) else Layout.HF_CLIP_VISION
    if "embeddings.patch_embedding.weight" in keys and any(k.startswith("encoder.layers.") for k in keys):
        return Layout.HF_CLIP_VISION
    return None


# (Hugging Face name under the vision prefix, canonical name); {n} is a block index,
# {p} is weight or bias. q/k/v and the projection are handled separately.
_NAME_PAIRS = (
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.patch_embedding.weight", "conv1.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("pre_layrnorm.{p}", "ln_pre.{p}"),
    ("post_layernorm.{p}", "ln_post.{p}"),
    ("encoder.layers.{n}.layer_norm1.{p}", "transformer.resblocks.{n}.ln_1.{p}"),
    ("encoder.layers.{n}.layer_norm2.{p}", "transformer.resblocks.{n}.ln_2.{p}"),
    ("encoder.layers.{n}.mlp.fc1.{p}", "transformer.resblocks.{n}.mlp.c_fc.{p}"),
    ("encoder.layers.{n}.mlp.fc2.{p}", "transformer.resblocks.{n}.mlp.c_proj.{p}"),
    ("encoder.layers.{n}.self_attn.out_proj.{p}", "transformer.resblocks.{n}.attn.out_proj.{p}"),
)
_HF_QKV = re.compile(r"^encoder\.layers\.(?P<n>\d+)\.self_attn\.(?P<part>[qkv])_proj\.(?P<p>weight|bias)$")
_CANONICAL_QKV = re.compile(r"^transformer\.resblocks\.(?P<n>\d+)\.attn\.in_proj_(?P<p>weight|bias)$")
_HF_IGNORED = re.compile(r"^embeddings\.position_ids$")


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{pattern}$")


_HF_TO_CANONICAL = [(_template_regex(hf), canonical) for hf, canonical in _NAME_PAIRS]
_CANONICAL_TO_HF = [(_template_regex(canonical), hf) for hf, canonical in _NAME_PAIRS]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


def hf_prefix(keys: Iterable[str]) -> str:
    """``vision_model.`` for transformers 4 files and CLIPModel, ``""`` for transformers 5 CLIPVisionModel."""
    return HF_PREFIX if any(k.startswith(HF_PREFIX) for k in keys) else ""


def canonical_recipes(layout: Layout, keys: Iterable[str]) -> dict[str, Recipe]:
    """For each canonical key of the image encoder, the recipe that builds it from ``keys``."""
    keys = list(keys)
    if layout is Layout.OPEN_CLIP_VISUAL:
        return {k: Recipe((k,)) for k in keys}
    if layout is Layout.OPEN_CLIP:
        n = len(OPEN_CLIP_PREFIX)
        return {k[n:]: Recipe((k,)) for k in keys if k.startswith(OPEN_CLIP_PREFIX)}
    return _hf_recipes(keys)


def _hf_recipes(keys: list[str]) -> dict[str, Recipe]:
    prefix = hf_prefix(keys)
    recipes: dict[str, Recipe] = {}
    qkv: dict[tuple[str, str], dict[str, str]] = {}
    for key in keys:
        if key == HF_PROJECTION:
            recipes["proj"] = Recipe((key,), "transpose")
            continue
        if not key.startswith(prefix) or (prefix == "" and not _looks_like_hf_vision(key)):
            continue  # text tower, logit_scale, text_projection: not part of the image encoder
        name = key[len(prefix) :]
        if _HF_IGNORED.match(name):
            continue
        match = _HF_QKV.match(name)
        if match:
            qkv.setdefault((match["n"], match["p"]), {})[match["part"]] = key
            continue
        canonical = _rename(name, _HF_TO_CANONICAL)
        if canonical is None:
            raise CheckpointError(f"unexpected key {key} for a Hugging Face CLIP vision layout")
        recipes[canonical] = Recipe((key,))
    for (n, p), parts in qkv.items():
        missing = [part for part in "qkv" if part not in parts]
        if missing:
            raise CheckpointError(f"block {n} has no {missing[0]}_proj.{p} but has the other projections")
        recipes[f"transformer.resblocks.{n}.attn.in_proj_{p}"] = Recipe(tuple(parts[x] for x in "qkv"), "concat")
    return recipes


def _looks_like_hf_vision(key: str) -> bool:
    return key.startswith(("embeddings.", "pre_layrnorm.", "post_layernorm.", "encoder."))


def to_canonical(state: Mapping[str, Tensor], layout: Layout | None = None) -> dict[str, Tensor]:
    """Convert a state dict in any supported layout to the canonical image-encoder keys."""
    layout = detect_layout(state.keys()) if layout is None else layout
    return {k: r.build(state.__getitem__) for k, r in canonical_recipes(layout, state.keys()).items()}


def to_open_clip(state: Mapping[str, Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, Tensor]:
    """Canonical keys → a (partial) open_clip CLIP state dict, image tower under ``visual.``."""
    return {prefix + k: v for k, v in state.items()}


def to_hf(state: Mapping[str, Tensor], include_projection: bool = True, prefix: str = HF_PREFIX) -> dict[str, Tensor]:
    """Canonical keys → Hugging Face CLIPVisionModel keys (``vision_model.*``).

    q/k/v are split out of the packed projection, ``proj`` becomes the transposed
    ``visual_projection.weight`` (kept only if ``include_projection``; CLIPVisionModel has
    none). A key open_clip has but transformers cannot express raises, naming it.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key == "proj":
            if include_projection:
                out[HF_PROJECTION] = tensor.t().contiguous()
            continue
        match = _CANONICAL_QKV.match(key)
        if match:
            d = tensor.shape[0] // 3
            for i, part in enumerate("qkv"):
                name = f"encoder.layers.{match['n']}.self_attn.{part}_proj.{match['p']}"
                out[prefix + name] = tensor[i * d : (i + 1) * d].contiguous()
            continue
        name = _rename(key, _CANONICAL_TO_HF)
        if name is None:
            raise CheckpointError(f"parameter {key} has no Hugging Face CLIPVisionModel equivalent")
        out[prefix + name] = tensor
    return out
