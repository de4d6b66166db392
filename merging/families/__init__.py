"""Model families and the registry that tells which one a checkpoint belongs to.

Each family (:class:`ModelFamily`) owns everything specific to one kind of network; the
registry recognises a checkpoint's family from its parameter names alone (before any
weight is read). A checkpoint no family recognises raises, naming it and what was expected,
rather than being merged with nothing recognised as a matrix.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from merging.errors import CheckpointError
from merging.families.base import Architecture, Layout, Model, ModelFamily, Recipe
from merging.families.clip_vit import CLIP_VIT
from merging.families.mlp import MLP_FAMILY

FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add a family to the registry under its ``name``."""
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


for _family in (CLIP_VIT, MLP_FAMILY):
    register(_family)


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name``; an unknown name raises, listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}") from None


def recognise(keys: Iterable[str], source: str | None = None) -> tuple[ModelFamily, Layout]:
    """The family and layout of a checkpoint with parameter names ``keys``.

    Raises :class:`CheckpointError` naming ``source``, a sample of its keys and what the
    families expect when none recognises them (or when one recognises but cannot merge them).
    """
    names: Collection[str] = set(keys)
    where = f"{source}: " if source else ""
    for family in FAMILIES.values():
        try:
            layout = family.recognise(names)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}{exc}") from None
        if layout is not None:
            return family, layout
    sample = ", ".join(sorted(names)[:4]) or "no tensors at all"
    expected = " nor ".join(f.kind for f in FAMILIES.values())
    raise CheckpointError(f"{where}unknown checkpoint layout: not {expected} (keys: {sample}, ...)")


def family_of(keys: Iterable[str], source: str | None = None) -> ModelFamily:
    """The family of a checkpoint (or of an in-memory state dict) with these parameter names."""
    return recognise(keys, source)[0]


def output_formats() -> list[str]:
    """Every format some family writes, for the command line's choices."""
    return list(dict.fromkeys(fmt for family in FAMILIES.values() for fmt in family.formats))


__all__ = [
    "FAMILIES",
    "Architecture",
    "Layout",
    "Model",
    "ModelFamily",
    "Recipe",
    "family_of",
    "get_family",
    "output_formats",
    "recognise",
    "register",
]
