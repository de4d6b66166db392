"""The registry of continual merging methods: one module per method, looked up by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import OptionError
from ..image_set import ImageSet
from .base import ContinualMerger, MergeContext, Option, StepInput, StepResult
from .magmax import MagMax
from .opcm import OPCM
from .otmf import OTMF
from .task_arithmetic import TaskArithmetic
from .ties import TIES
from .weight_average import WeightAverage

METHODS: dict[str, type[ContinualMerger]] = {}


def register(cls: type[ContinualMerger]) -> type[ContinualMerger]:
    """Add a method class to the registry under its ``name`` (usable as a decorator)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


for _cls in (OPCM, OTMF, TaskArithmetic, WeightAverage, TIES, MagMax):
    register(_cls)


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> type[ContinualMerger]:
    """The class registered as ``name``; an unknown name raises, listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise OptionError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None


def create_merger(name: str, options: Mapping[str, Any] | None = None) -> ContinualMerger:
    """A new merger of method ``name`` with ``options`` (strings are parsed, as from the CLI)."""
    return get_method(name)(**dict(options or {}))


__all__ = [
    "METHODS",
    "ContinualMerger",
    "ImageSet",
    "MergeContext",
    "Option",
    "StepInput",
    "StepResult",
    "create_merger",
    "get_method",
    "method_names",
    "register",
]
