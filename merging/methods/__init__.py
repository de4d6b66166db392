"""The registry of continual merging methods: one module per method, found by name.

A method is a :class:`ContinualMerger` subclass in a module of its own. The registry finds
them without a list to edit: every module of this package, and every module named in the
``MERGING_METHOD_MODULES`` environment variable (comma separated, importable from
``sys.path``) or in the ``merging.methods`` entry-point group of an installed package, is
imported the first time the registry is consulted, and each concrete subclass with a
``name`` defined there is registered. ``@register`` adds a class explicitly (a notebook,
a test). The built-in methods keep the papers' order; others follow in the order found.

Importing this package imports the method modules but none of their heavy dependencies
(OTMF imports POT only when it computes an OT loss).
"""

from __future__ import annotations

import inspect
import os
import pkgutil
import threading
from collections.abc import Iterator, Mapping
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from merging.errors import OptionError
from merging.evaluation.image_set import ImageSet
from merging.methods.base import ContinualMerger, Diagnostic, MergeContext, Option, StepInput, StepResult

DEFAULT_METHOD = "opcm"
# The papers' order, used for --method all, the UI and results; discovered methods follow.
BUILTIN_ORDER = ("opcm", "otmf", "task_arithmetic", "weight_average", "ties", "magmax")
PLUGIN_VARIABLE = "MERGING_METHOD_MODULES"
ENTRY_POINT_GROUP = "merging.methods"


class MethodRegistry(Mapping[str, type[ContinualMerger]]):
    """Method name → class, filled on first use from this package, plug-in modules and entry points."""

    def __init__(self) -> None:
        self._classes: dict[str, type[ContinualMerger]] = {}
        self._loaded = False
        self._loading = False  # the loading thread re-entering (a module that consults the registry)
        self._lock = threading.RLock()

    def register(self, cls: type[ContinualMerger]) -> type[ContinualMerger]:
        """Add a method class under its ``name`` (a decorator too); another class may not take a used name."""
        with self._lock:
            existing = self._classes.get(cls.name)
            if existing is not None and existing is not cls and _qualname(existing) != _qualname(cls):
                raise ValueError(f"method name {cls.name!r} is already registered by {_qualname(existing)}")
            self._classes[cls.name] = cls
        return cls

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:  # other threads wait here until the registry is complete
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                self._discover()
                self._loaded = True  # only once complete: a failed import is retried, not left half-loaded
            finally:
                self._loading = False

    def _discover(self) -> None:
        """Import the package's method modules, the plug-in modules and entry points; register what they define."""
        found: dict[str, type[ContinualMerger]] = {}
        for module in _package_modules():
            found.update(_methods_in(import_module(module)))
        for module in _plugin_modules():
            try:
                found.update(_methods_in(import_module(module)))
            except ImportError as exc:
                raise OptionError(f"cannot import method module {module!r} (from {PLUGIN_VARIABLE}): {exc}") from None
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            loaded = entry.load()
            found.update(_methods_in(loaded) if inspect.ismodule(loaded) else {loaded.name: loaded})
        ordered = [n for n in BUILTIN_ORDER if n in found] + [n for n in found if n not in BUILTIN_ORDER]
        explicit = dict(self._classes)
        self._classes = {}
        for name in ordered:
            self.register(found[name])
        for cls in explicit.values():
            self.register(cls)

    def __getitem__(self, name: str) -> type[ContinualMerger]:
        self._load()
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._classes))

    def __len__(self) -> int:
        self._load()
        return len(self._classes)

    def unregister(self, name: str) -> None:
        """Remove a method (tests that register a toy method clean up with this)."""
        with self._lock:
            self._classes.pop(name, None)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _package_modules() -> list[str]:
    return [
        f"{__name__}.{info.name}"
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_") and info.name != "base"
    ]


def _plugin_modules() -> list[str]:
    return [name.strip() for name in os.environ.get(PLUGIN_VARIABLE, "").split(",") if name.strip()]


def _methods_in(module: Any) -> dict[str, type[ContinualMerger]]:
    """The concrete method classes a module defines (not those it imports)."""
    return {
        cls.name: cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, ContinualMerger)
        and cls.__module__ == module.__name__
        and not inspect.isabstract(cls)
        and isinstance(getattr(cls, "name", None), str)
    }


METHODS = MethodRegistry()
register = METHODS.register


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
    "DEFAULT_METHOD",
    "METHODS",
    "ContinualMerger",
    "Diagnostic",
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
