"""The typed record of a continual run: what every step gave every method, and results.json.

One :class:`RunResults` is filled step by step by the runner, shown by the plots, printed by
the command line and kept (as JSON) in the app's session state. The accuracy matrix a[i][t]
is built here and only here (:func:`accuracy_matrix`); ACC and BWT per step are derived from
it, so they cannot disagree with the matrix they summarise.

The lab's live analysis adds one :class:`AnalysisStep` per step (``analysis`` in results.json,
absent when nothing was analysed, so older readers are unaffected).

``to_json`` writes the layout results.json has always had, plus ``schema_version``;
``from_json`` reads that and the files written before the version existed (version 1).
Nothing here imports torch, so the plots and the app's state stay light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from merging.errors import MergingError
from merging.experiment.metrics import acc, bwt

SCHEMA_VERSION = 2  # 1: results.json before the field existed (same layout otherwise)

Matrix = list[list[float | None]]


def accuracy_matrix(columns: Sequence[Mapping[str, float]], tasks: Sequence[str]) -> Matrix:
    """a[i][t]: the accuracy on ``tasks[i]`` in step ``t``'s column (None where not evaluated).

    A column holds at least the tasks seen by its step (all tasks when a run evaluates
    everything); the metrics take the rows of the seen tasks, the plots all of them.
    """
    return [[column.get(task) for column in columns] for task in tasks]


@dataclass
class StepRecord:
    """One method after one step: its accuracies, costs and own diagnostics."""

    accuracy: dict[str, float]
    merge_seconds: float
    eval_seconds: float
    peak_memory_bytes: int | None  # the process's (or GPU's) peak during the merge
    memory_increase_bytes: int | None  # that peak minus what was in use when the merge began
    diagnostics: dict[str, Any]
    # With tuned heads (the method's ``tunes_heads``): the same tasks measured with zero-shot heads.
    accuracy_zeroshot_head: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "merge_seconds": self.merge_seconds,
            "eval_seconds": self.eval_seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_increase_bytes": self.memory_increase_bytes,
            "diagnostics": self.diagnostics,
        }


@dataclass
class MethodResults:
    """One method's steps in a run over ``tasks`` (the run's merge order)."""

    name: str
    options: dict[str, Any]
    tasks: list[str]
    steps: list[StepRecord] = field(default_factory=list)

    def matrix(self, zeroshot_heads: bool = False, all_tasks: bool = False) -> Matrix:
        """The accuracy matrix over the steps so far: rows are the tasks seen (every task of the
        run with ``all_tasks``), columns the steps; with zero-shot heads if asked and measured."""
        if zeroshot_heads:
            columns = [s.accuracy_zeroshot_head or {} for s in self.steps]
        else:
            columns = [s.accuracy for s in self.steps]
        return accuracy_matrix(columns, self.tasks if all_tasks else self.tasks[: len(columns)])

    @property
    def acc_per_step(self) -> list[float]:
        matrix = self.matrix()
        return [acc(matrix, t) for t in range(len(self.steps))]

    @property
    def bwt_per_step(self) -> list[float | None]:
        matrix = self.matrix()
        return [bwt(matrix, t) for t in range(len(self.steps))]

    @property
    def acc(self) -> float | None:
        """ACC after the last completed step (None before the first)."""
        return acc(self.matrix()) if self.steps else None

    @property
    def bwt(self) -> float | None:
        return bwt(self.matrix()) if self.steps else None

    @property
    def has_zeroshot_heads(self) -> bool:
        return bool(self.steps) and self.steps[0].accuracy_zeroshot_head is not None

    @property
    def acc_zeroshot_head(self) -> float | None:
        """ACC of the same merged encoders with the zero-shot heads (methods that tune heads)."""
        return acc(self.matrix(zeroshot_heads=True)) if self.has_zeroshot_heads else None

    @property
    def bwt_zeroshot_head(self) -> float | None:
        return bwt(self.matrix(zeroshot_heads=True)) if self.has_zeroshot_heads else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "options": self.options,
            "accuracy": [s.accuracy for s in self.steps],
            "acc": self.acc,
            "bwt": self.bwt,
            "acc_per_step": self.acc_per_step,
            "bwt_per_step": self.bwt_per_step,
        }
        if self.has_zeroshot_heads:
            data["accuracy_zeroshot_head"] = [s.accuracy_zeroshot_head or {} for s in self.steps]
            data["acc_zeroshot_head"] = self.acc_zeroshot_head
            data["bwt_zeroshot_head"] = self.bwt_zeroshot_head
        data["steps"] = [s.to_json() for s in self.steps]
        return data

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any], tasks: Sequence[str]) -> MethodResults:
        accuracy = list(data.get("accuracy", []))
        timings = list(data.get("steps", []))
        heads = data.get("accuracy_zeroshot_head")
        if len(timings) != len(accuracy):
            raise MergingError(f"results of {name}: {len(accuracy)} accuracy columns but {len(timings)} steps")
        steps = [
            StepRecord(
                accuracy=dict(column),
                merge_seconds=step.get("merge_seconds", 0.0),
                eval_seconds=step.get("eval_seconds", 0.0),
                peak_memory_bytes=step.get("peak_memory_bytes"),
                memory_increase_bytes=step.get("memory_increase_bytes"),
                diagnostics=dict(step.get("diagnostics", {})),
                accuracy_zeroshot_head=None if heads is None else dict(heads[index]),
            )
            for index, (column, step) in enumerate(zip(accuracy, timings, strict=True))
        ]
        return cls(name, dict(data.get("options", {})), list(tasks), steps)


@dataclass
class AnalysisStep:
    """The live analysis after one step (:mod:`merging.experiment.live_analysis`): the new task
    vector τ_t against the earlier ones and each method's merged delta Δ_m, and one layer's spectra."""

    step: int
    task: str
    layer: str  # the matrix whose spectra were taken (a label the family's get_matrix takes)
    layer_name: str  # how the page names it, e.g. "block 3 · mlp.c_fc"
    task_norm: float  # ‖τ_t‖, exact
    task_cosines: list[float]  # cos(τ_t, τ_i) for i < t (sketched unless ``exact``)
    merged_norms: dict[str, float]  # ‖Δ_m‖ after this step, exact
    merged_cosines: dict[str, list[float]]  # cos(Δ_m, τ_i) for i ≤ t (i = t exact, i < t sketched unless exact)
    merged_pairs: dict[str, dict[str, float]]  # cos(Δ_a, Δ_b) for a listed before b, exact
    task_spectrum: list[float]  # singular values of τ_t's layer, descending
    merged_spectra: dict[str, list[float]]  # singular values of each Δ_m's layer
    exact: bool  # True when the encoder fits in the sketch and every cosine is exact
    sketch_dimension: int
    seconds: float  # what the analysis of this step took

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AnalysisStep:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass
class RunResults:
    """A run's results: its configuration (as saved, replayable), tasks, reference rows, methods."""

    config: dict[str, Any]
    tasks: list[str]
    methods: dict[str, MethodResults]
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    downloads: str | None = None  # the app's session folder holding this run's files
    analysis: list[AnalysisStep] = field(default_factory=list)  # the live analysis, one entry per step analysed

    @property
    def completed_steps(self) -> int:
        return max((len(m.steps) for m in self.methods.values()), default=0)

    @property
    def total_steps(self) -> int:
        return len(self.config.get("checkpoints", [])) or len(self.tasks)

    def snapshot(self, **changes: Any) -> RunResults:
        """A copy that later steps of the run do not change (the steps themselves are shared)."""
        methods = {n: replace(m, steps=list(m.steps)) for n, m in self.methods.items()}
        return replace(self, methods=methods, warnings=list(self.warnings), analysis=list(self.analysis), **changes)

    def to_json(self) -> dict[str, Any]:
        data = {
            "schema_version": SCHEMA_VERSION,
            "config": self.config,
            "tasks": list(self.tasks),
            "completed_steps": self.completed_steps,
            "warnings": list(self.warnings),
            "reference": self.reference,
            "methods": {name: m.to_json() for name, m in self.methods.items()},
        }
        if self.downloads is not None:
            data["downloads"] = self.downloads
        if self.analysis:
            data["analysis"] = [a.to_json() for a in self.analysis]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResults:
        """Results as written by :meth:`to_json`, or by any earlier version of the lab."""
        if not isinstance(data, Mapping):
            raise MergingError("results must be a JSON object")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise MergingError(
                f"results written by a newer version of the lab (schema {version}; this one reads up to "
                f"{SCHEMA_VERSION}): update the lab to read them"
            )
        try:
            tasks = [str(t) for t in data["tasks"]]
            methods = {
                str(name): MethodResults.from_json(str(name), method, tasks) for name, method in data["methods"].items()
            }
            analysis = [AnalysisStep.from_json(a) for a in data.get("analysis") or []]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise MergingError(f"not a results file of the lab: {exc!r}") from None
        downloads = data.get("downloads")
        return cls(
            config=dict(data.get("config", {})),
            tasks=tasks,
            methods=methods,
            reference=dict(data.get("reference") or {}),
            warnings=list(data.get("warnings", [])),
            downloads=str(downloads) if downloads else None,
            analysis=analysis,
        )
