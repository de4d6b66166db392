"""The streaming interface every continual merging method implements, and its options.

A merger is created with its options, given the pretrained encoder once (:meth:`start`),
then receives fine-tuned encoders one at a time (:meth:`step`) and returns the merged
encoder after each. It keeps only what ALGORITHMS.md allows: the pretrained encoder, the
merged one, per-method state of the same size at most, and scalars. It never keeps an
incoming checkpoint past the step that received it, so memory does not grow with T.

All arithmetic is float32 on the merger's device, whatever the storage dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from merging.compute.parallel import map_on_threads
from merging.errors import CheckpointError, MergingError, OptionError
from merging.evaluation.image_set import ImageSet
from merging.io.state_dict import StateDict, distance

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from merging.experiment.results import MethodResults
    from merging.families import ModelFamily

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


@dataclass(frozen=True)
class Diagnostic:
    """One number (or structure) a method reports after each step, declared so that tools know it.

    ``kind`` is the JSON-ready type of the value (``float``, ``int``, ``str``, ``list``,
    ``dict``); ``optional`` values may be missing or None on some steps (the first, say).
    """

    name: str
    kind: type | tuple[type, ...]
    help: str
    optional: bool = False

    def check(self, method: str, value: Any) -> None:
        if value is None and self.optional:
            return
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if float in kinds:
            kinds = (*kinds, int)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise TypeError(f"{method} diagnostic {self.name}={value!r} is not of the declared kind {self.kind}")


# What every step reports, whatever the method (the base class measures them).
COMMON_DIAGNOSTICS = (
    Diagnostic("step", int, "the step's number, from 1"),
    Diagnostic("task_norm", float, "‖θ_t − θ0‖ of the incoming checkpoint over the merged parameters"),
    Diagnostic("merged_norm", float, "‖θ^(t) − θ0‖ of the merged encoder after the step"),
)


@dataclass
class StepResult:
    """What a merger returns after each step.

    ``merged`` is the merger's live state (float32, on its device): it changes at the next
    step, so copy it to keep it. ``diagnostics`` holds JSON-ready numbers for the UI.

    ``model`` is set by methods whose merged model is not a plain encoder (MINGLE's gated
    experts): a module on the merger's device mapping the encoder's normalised input to image
    features before L2 normalisation (the image tower's forward). Evaluation then runs it
    instead of loading ``merged``, which stays a plain-encoder view of the model for tools
    that need one (analysis plots, encoder downloads); the method documents what that view is.
    """

    merged: StateDict
    diagnostics: dict[str, Any]
    model: nn.Module | None = None


@dataclass
class MergeContext:
    """What a data-driven method gets besides weights, from the runner.

    ``encoder`` is an image tower holding the pretrained weights, used only through
    ``torch.func.functional_call`` (its own parameters are never changed); its forward is
    ``encode_image`` before L2 normalisation. ``images(task, split)`` returns that split's
    deterministic sample, ``prepare`` turns a uint8 batch into the normalised float input
    on the merger's device, ``head(task)`` is the task's zero-shot head.
    """

    encoder: nn.Module
    images: Callable[[str, str], ImageSet]
    prepare: Callable[[Tensor], Tensor]
    head: Callable[[str], Tensor]
    logit_scale: float
    seed: int = 0


class ContinualMerger(ABC):
    """Base class: option parsing, key and shape checks, float32 conversion, common diagnostics."""

    name: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    # Data-driven methods (OTMF) learn from images of the tasks: they need a MergeContext.
    requires_data: ClassVar[bool] = False
    # What each step reports beyond COMMON_DIAGNOSTICS; a step returning anything else fails.
    diagnostics: ClassVar[tuple[Diagnostic, ...]] = ()
    # The method's key in assets/reference/reference_results.json, if the papers report it.
    published_name: ClassVar[str | None] = None
    # How the method works, in Markdown with $math$, for the app's explanations.
    explanation: ClassVar[str] = ""
    # The label of the method's live "internals" figure (see live_figure), if it draws one.
    figure_title: ClassVar[str | None] = None

    # Methods that treat matrix parameters apart from the others (OPCM projects them) find
    # them through the model family, which start() then requires.
    uses_matrices: ClassVar[bool] = False

    def __init__(self, **options: Any):
        self.config = self.parse_options(options)
        self.device = torch.device("cpu")
        self.pretrained: StateDict = {}
        self.merged: StateDict = {}
        self.merge_keys: list[str] = []
        self.step_count = 0
        self.context: MergeContext | None = None
        self.family: ModelFamily | None = None

    def attach(self, context: MergeContext) -> None:
        """Give the merger access to the backbone's image tower and the tasks' images."""
        self.context = context

    def merged_model(self) -> nn.Module | None:
        """The merged model as a module when it is not a plain encoder (see :class:`StepResult`); None otherwise."""
        return None

    def data_splits(self) -> tuple[str, ...]:
        """The splits ("train", "test") this merger reads task images from, with its options; () when data-free.

        The runner checks before the first step that every task has them, so a missing split
        fails in a second with one line rather than after a merge step.
        """
        return ("train", "test") if self.requires_data else ()

    def save_model(self, path: str | Path) -> list[Path]:
        """Write :meth:`merged_model` to ``path`` when the method has one; [] for plain-encoder methods.

        Plain encoders are written by the model family from ``merged``; a method whose merged
        model is a module of its own (MINGLE) knows its format and implements this.
        """
        return []

    def per_task_bytes(self) -> int:
        """The most state (bytes) one more task adds: 0 for methods whose memory is bounded in T.

        A method whose merged model legitimately grows with the tasks (MINGLE adds experts and
        gates per task) declares that growth here, once started; the streaming tests hold it to it.
        """
        return 0

    def heads(self) -> dict[str, Tensor]:
        """Classification heads the method has tuned (task → classes × dim); zero-shot otherwise."""
        return {}

    @classmethod
    def step_summary(cls, diagnostics: Mapping[str, Any]) -> list[str]:
        """What a progress line says about one step beyond the task and merged norms (the method's own numbers)."""
        return []

    @classmethod
    def live_figure(cls, results: MethodResults) -> Figure | None:
        """The method's internals after the steps so far (a plotly figure), or None if it draws none.

        Called by the app after every step with the typed results (steps and their declared
        diagnostics); import plotly inside, so that importing the method stays light.
        """
        return None

    @classmethod
    def spectrum_marks(cls, options: Mapping[str, Any]) -> dict[str, float]:
        """Levels to mark on the normalised cumulative spectrum (label → share), e.g. OPCM's α cut."""
        return {}

    @classmethod
    def check_diagnostics(cls, diagnostics: Mapping[str, Any]) -> None:
        """Raise unless every reported diagnostic is declared (common or the method's) with its kind."""
        declared = {d.name: d for d in (*COMMON_DIAGNOSTICS, *cls.diagnostics)}
        for name, value in diagnostics.items():
            if name not in declared:
                raise TypeError(f"{cls.name} reported diagnostic {name!r}, which it does not declare")
            declared[name].check(cls.name, value)

    @property
    def tunes_heads(self) -> bool:
        """Whether :meth:`heads` may replace zero-shot heads (then runs also report zero-shot-head accuracy)."""
        return False

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``options``; unknown names and bad values raise, listing valid ones."""
        known = {o.name: o for o in cls.options}
        for name in options:
            if name not in known:
                valid = ", ".join(known) if known else "none (this method takes no options)"
                raise OptionError(f"unknown option {name!r} for {cls.name}; valid options: {valid}")
        return {n: (o.parse(cls.name, options[n]) if n in options else o.default) for n, o in known.items()}

    def start(
        self, pretrained: Mapping[str, Tensor], device: torch.device | str = "cpu", family: ModelFamily | None = None
    ) -> None:
        """Take the pretrained encoder θ0 (copied to float32 on ``device``) and its model family.

        The family tells which parameters are matrices. A method that treats matrices apart
        (:attr:`uses_matrices`) given none recognises it from θ0's keys, and keys no family
        recognises raise rather than merge with no matrix found; element-wise methods need none.
        """
        if family is None and self.uses_matrices:
            from merging.families import family_of

            family = family_of(pretrained.keys(), "the pretrained encoder")
        self.family = family
        self.device = torch.device(device)
        self.pretrained = {k: v.to(self.device, torch.float32, copy=True) for k, v in pretrained.items()}
        self.merged = {}
        self.merge_keys = []
        self.step_count = 0

    def step(self, finetuned: Mapping[str, Tensor], task: str | None = None, last: bool = False) -> StepResult:
        """Merge one more fine-tuned encoder θ_t; return the merged encoder and diagnostics.

        ``task`` names θ_t's task and ``last`` says no checkpoint follows; only data-driven
        methods use them (OTMF needs the task's images and tunes a final head).

        ``finetuned`` may be a lazy mapping (:class:`merging.io.checkpoints.EncoderReader`):
        it is then read one parameter at a time and never held whole. Everything is checked
        (keys, shapes, finite values) before the merged state changes, so a bad checkpoint
        raises and leaves the merger as it was after the previous step.
        """
        if not self.pretrained:
            raise RuntimeError("start() must be called with the pretrained encoder before step()")
        if self.requires_data and (self.context is None or task is None):
            raise MergingError(
                f"{self.name} learns from images of each task, so it needs task data: run it with "
                "`python -m merging run` (or the app), not `python -m merging merge`"
            )
        incoming = Incoming(finetuned, self._check_keys(finetuned), self.device)
        task_norm = self._validated_task_norm(incoming)
        if not self.merge_keys:
            self.merge_keys = incoming.keys()
        self.step_count += 1
        if self.step_count == 1:
            self.merged = {k: v.clone() for k, v in self.pretrained.items()}
        step = StepInput(self.step_count, incoming, task_norm, task, last, self.context)
        diagnostics = {"step": self.step_count, "task_norm": task_norm}
        diagnostics.update(self._merge(step))
        if "merged_norm" not in diagnostics:
            diagnostics["merged_norm"] = distance(self.merged, self.pretrained, self.merge_keys)
        self.check_diagnostics(diagnostics)
        return StepResult(self.merged, diagnostics, self.merged_model())

    def _check_keys(self, finetuned: Mapping[str, Tensor]) -> list[str]:
        name = _name(finetuned, self.step_count + 1)
        extra = [k for k in finetuned if k not in self.pretrained]
        if extra:
            raise CheckpointError(f"{name} has parameter {extra[0]}, which the pretrained encoder lacks")
        keys = [k for k in self.pretrained if k in finetuned]
        if self.merge_keys and keys != self.merge_keys:
            differing = next((k for k in self.merge_keys if k not in finetuned), None) or next(
                k for k in keys if k not in self.merge_keys
            )
            raise CheckpointError(f"{name} differs from the first fine-tuned encoder at parameter {differing}")
        for k in keys:
            shape = _shape(finetuned, k)
            if shape != tuple(self.pretrained[k].shape):
                raise CheckpointError(
                    f"shape mismatch at {k}: pretrained {tuple(self.pretrained[k].shape)} vs {name} {shape}"
                )
        return keys

    def _validated_task_norm(self, incoming: Incoming) -> float:
        """‖θ_t − θ0‖, reading every parameter once and rejecting NaN or Inf before any update.

        A NaN or Inf anywhere in a parameter makes its norm NaN or Inf, so the norm alone
        screens for them in the same pass; only a parameter that fails is searched element by
        element (to tell non-finite values from finite ones too large to square in float32).
        """

        def checked_norm(key: str) -> float:
            tensor = incoming[key]
            norm = float(torch.linalg.vector_norm(tensor - self.pretrained[key]))
            if not math.isfinite(norm):
                if not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(f"{incoming.name} has NaN or Inf values in {key}")
                raise CheckpointError(f"{incoming.name} has values in {key} too large to merge in float32")
            return norm

        return math.sqrt(sum(norm**2 for norm in map_on_threads(checked_norm, incoming.keys(), self.device)))

    @abstractmethod
    def _merge(self, step: StepInput) -> dict[str, Any]:
        """Update ``self.merged`` in place from θ_t; return method-specific diagnostics.

        Read θ_t parameter by parameter (``step.checkpoint[key]``, float32 on the merger's
        device); the tensors may share memory with the caller's: never modify or keep them.
        """


@dataclass(frozen=True)
class StepInput:
    """Everything one step gives a method, in one immutable object (nothing is set on the merger).

    ``index`` counts from 1; ``task_norm`` is ‖θ_t − θ0‖ over the merged parameters,
    measured while the checkpoint was screened; ``task`` and ``is_last`` are known in a
    run (None / False from ``merge``); ``context`` gives data-driven methods the tasks' images.
    """

    index: int
    checkpoint: Incoming
    task_norm: float
    task: str | None = None
    is_last: bool = False
    context: MergeContext | None = None


class Incoming:
    """θ_t as the merger sees it: one parameter at a time, float32 on the merger's device."""

    def __init__(self, source: Mapping[str, Tensor], keys: list[str], device: torch.device):
        self.source = source
        self.name = _name(source, None)
        self.device = device
        self._keys = keys

    def keys(self) -> list[str]:
        return list(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __getitem__(self, key: str) -> Tensor:
        return self.source[key].to(self.device, torch.float32)


def _name(finetuned: Mapping[str, Tensor], step: int | None) -> str:
    source = getattr(finetuned, "source", None)
    if source is not None:
        return f"checkpoint {source}"
    return "the fine-tuned encoder" if step is None else f"fine-tuned encoder {step}"


def _shape(mapping: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    """A parameter's shape, from a lazy reader's header when it has one (no read)."""
    shape = getattr(mapping, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(mapping[key].shape)
