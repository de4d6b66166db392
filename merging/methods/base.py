"""The streaming interface every continual merging method implements, and its options.

A merger is created with its options, given the pretrained encoder once (:meth:`start`),
then receives fine-tuned encoders one at a time (:meth:`step`) and returns the merged
encoder after each. It keeps only what ALGORITHMS.md allows: the pretrained encoder, the
merged one, per-method state of the same size at most, and scalars. It never keeps an
incoming checkpoint past the step that received it, so memory does not grow with T.

All arithmetic is float32 on the merger's device, whatever the storage dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import CheckpointError, OptionError
from ..state_dict import StateDict, distance

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option of a method: its name (as the command line and UI spell it), default and range."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    @property
    def kind(self) -> type:
        return type(self.default)

    def valid_values(self) -> str:
        """The valid values in words, for error messages and help."""
        if self.choices is not None:
            return "one of " + ", ".join(_format(c) for c in self.choices)
        if self.kind is bool:
            return "one of true, false"
        if self.kind is str:
            return "text"
        kind = "an integer" if self.kind is int else "a number"
        low = "-inf" if self.minimum is None else _format(self.minimum)
        high = "inf" if self.maximum is None else _format(self.maximum)
        return f"{kind} in {'(' if self.exclusive_minimum else '['}{low}, {high}]"

    def parse(self, method: str, raw: Any) -> Any:
        """Convert ``raw`` (a command-line string or a Python value) and check its range."""
        value = self._convert(method, raw)
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{method} option {self.name}={_format(raw)} is invalid: must be {self.valid_values()}")
        too_low = self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        )
        too_high = self.maximum is not None and value > self.maximum
        if too_low or too_high:
            raise OptionError(
                f"{method} option {self.name}={_format(raw)} is out of range: must be {self.valid_values()}"
            )
        return value

    def _convert(self, method: str, raw: Any) -> Any:
        kind = self.kind
        try:
            if kind is bool:
                if isinstance(raw, bool):
                    return raw
                text = str(raw).strip().lower()
                if text in _TRUE or text in _FALSE:
                    return text in _TRUE
                raise ValueError
            if kind is float:
                if isinstance(raw, bool):
                    raise ValueError
                return float(raw)
            if kind is int:
                if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                    raise ValueError
                return int(raw)
            return str(raw).strip()
        except (TypeError, ValueError):
            raise OptionError(
                f"{method} option {self.name}={_format(raw)} is invalid: must be {self.valid_values()}"
            ) from None


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass
class StepResult:
    """What a merger returns after each step.

    ``merged`` is the merger's live state (float32, on its device): it changes at the next
    step, so copy it to keep it. ``diagnostics`` holds JSON-ready numbers for the UI.
    """

    merged: StateDict
    diagnostics: dict[str, Any]


class ContinualMerger(ABC):
    """Base class: option parsing, key and shape checks, float32 conversion, common diagnostics."""

    name: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, **options: Any):
        self.config = self.parse_options(options)
        self.device = torch.device("cpu")
        self.pretrained: StateDict = {}
        self.merged: StateDict = {}
        self.merge_keys: list[str] = []
        self.step_count = 0

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``options``; unknown names and bad values raise, listing valid ones."""
        known = {o.name: o for o in cls.options}
        for name in options:
            if name not in known:
                valid = ", ".join(known) if known else "none (this method takes no options)"
                raise OptionError(f"unknown option {name!r} for {cls.name}; valid options: {valid}")
        return {n: (o.parse(cls.name, options[n]) if n in options else o.default) for n, o in known.items()}

    def start(self, pretrained: Mapping[str, Tensor], device: torch.device | str = "cpu") -> None:
        """Take the pretrained encoder θ0 (copied to float32 on ``device``)."""
        self.device = torch.device(device)
        self.pretrained = {k: v.to(self.device, torch.float32, copy=True) for k, v in pretrained.items()}
        self.merged = {}
        self.merge_keys = []
        self.step_count = 0

    def step(self, finetuned: Mapping[str, Tensor]) -> StepResult:
        """Merge one more fine-tuned encoder θ_t; return the merged encoder and diagnostics."""
        if not self.pretrained:
            raise RuntimeError("start() must be called with the pretrained encoder before step()")
        incoming = self._prepare(finetuned)
        self.step_count += 1
        task_norm = distance(incoming, self.pretrained, self.merge_keys)
        if self.step_count == 1:
            self.merged = {k: v.clone() for k, v in self.pretrained.items()}
        diagnostics = {"step": self.step_count, "task_norm": task_norm}
        diagnostics.update(self._merge(incoming, task_norm))
        if "merged_norm" not in diagnostics:
            diagnostics["merged_norm"] = distance(self.merged, self.pretrained, self.merge_keys)
        return StepResult(self.merged, diagnostics)

    def _prepare(self, finetuned: Mapping[str, Tensor]) -> StateDict:
        keys = [k for k in self.pretrained if k in finetuned]
        extra = [k for k in finetuned if k not in self.pretrained]
        if extra:
            raise CheckpointError(f"fine-tuned encoder has parameter {extra[0]}, which the pretrained encoder lacks")
        if not self.merge_keys:
            self.merge_keys = keys
        elif keys != self.merge_keys:
            missing = next((k for k in self.merge_keys if k not in finetuned), None) or next(
                k for k in keys if k not in self.merge_keys
            )
            raise CheckpointError(
                f"fine-tuned encoder {self.step_count + 1} differs from the first at parameter {missing}"
            )
        incoming: StateDict = {}
        for k in keys:
            tensor = finetuned[k]
            if tuple(tensor.shape) != tuple(self.pretrained[k].shape):
                raise CheckpointError(
                    f"shape mismatch at {k}: pretrained {tuple(self.pretrained[k].shape)} "
                    f"vs fine-tuned {tuple(tensor.shape)}"
                )
            incoming[k] = tensor.to(self.device, torch.float32)
        return incoming

    @abstractmethod
    def _merge(self, incoming: StateDict, task_norm: float) -> dict[str, Any]:
        """Update ``self.merged`` in place from θ_t; return method-specific diagnostics.

        ``incoming`` may share memory with the caller's tensors: never modify or keep it.
        """
