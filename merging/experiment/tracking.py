"""Experiment trackers: a run's or a sweep's results in TensorBoard or MLflow, where researchers compare runs.

Optional: nothing here is imported unless ``--tracker`` is given, and a missing package is
one line saying what to install (:func:`check_tracker`, called before any work). A tracker
logs what results.json holds, after the run or trial has written it, so it sees exactly the
recorded numbers and a tracker failure can never lose results: the configuration (as
parameters), per step ACC, BWT, every task's accuracy and the method's numeric diagnostics
(as metrics with the step as x), and results.json itself.

Grouping: a sweep's trials go under one MLflow parent run (``mlflow.parentRunId``), which also
gets each row's mean ± std and summary.json at the end; in TensorBoard each trial has its own
directory under the sweep's (``DIR/tensorboard/ROW/seed-S``), which TensorBoard shows as runs
that filter by row. MLflow's store is MLflow's own setting (``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``; default experiment "continual-merging").
"""

from __future__ import annotations

import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from merging.errors import MergingError
from merging.experiment.results import RunResults

TRACKERS = ("tensorboard", "mlflow")
INSTALL = {
    "tensorboard": "pip install tensorboard",
    "mlflow": "pip install mlflow-skinny (or mlflow)",
}
DEFAULT_EXPERIMENT = "continual-merging"
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in metric and parameter names


def check_tracker(kind: str) -> None:
    """Fail now, in one line, if ``kind`` is unknown or its package is missing."""
    if kind not in TRACKERS:
        raise MergingError(f"unknown tracker {kind!r}; valid trackers: {', '.join(TRACKERS)}")
    try:
        if kind == "tensorboard":
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        else:
            import mlflow  # noqa: F401
    except ImportError:
        raise MergingError(
            f"--tracker {kind} needs the {kind} package, which is not installed: {INSTALL[kind]}"
        ) from None


def clean_name(name: str) -> str:
    """A metric or parameter name MLflow accepts (TensorBoard takes it as well): other characters become _."""
    return _METRIC_NAME.sub("_", name)


def parameters(results: RunResults) -> dict[str, str]:
    """The run's configuration as flat parameters: the settings, then each method's options as METHOD.KEY."""
    config = results.config
    params = {key: str(config.get(key)) for key in ("backbone", "preset", "samples", "eval", "device", "order_seed")}
    params["checkpoints"] = str(len(config.get("checkpoints", [])))
    params["methods"] = ",".join(results.methods)
    for method, data in results.methods.items():
        for key, value in data.options.items():
            params[clean_name(f"{method}.{key}")] = json.dumps(value) if not isinstance(value, str) else value
    return params


def metrics(results: RunResults) -> Iterator[tuple[str, float, int]]:
    """(name, value, step) for every per-step number: ACC, BWT, each task's accuracy, numeric diagnostics."""
    for method, data in results.methods.items():
        prefix = clean_name(method)
        bwt = data.bwt_per_step
        for index, (step, acc) in enumerate(zip(data.steps, data.acc_per_step, strict=True)):
            number = index + 1
            yield f"{prefix}/acc", acc, number
            if bwt[index] is not None:
                yield f"{prefix}/bwt", bwt[index], number
            for task, value in step.accuracy.items():
                yield f"{prefix}/accuracy/{clean_name(task)}", value, number
            for key, value in step.diagnostics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    yield f"{prefix}/diagnostics/{clean_name(key)}", float(value), number


class Tracker(ABC):
    """Where runs are logged: :meth:`log_run` per run or trial, :meth:`finish` once (with a sweep's summary)."""

    @abstractmethod
    def log_run(self, results: RunResults, files: Sequence[Path], name: str, folder: str = ".") -> None:
        """Log one run or trial; ``folder`` is its place under a sweep (TensorBoard's directory)."""

    @abstractmethod
    def finish(self, summary: Mapping[str, Any] | None = None, files: Sequence[Path] = ()) -> None:
        """Close the group: a sweep's summary (its rows' means) and files go to the group's own record."""


class TensorBoardTracker(Tracker):
    """Event files under ``root`` (one directory per run or trial: ``root/folder``), results.json beside them."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def log_run(self, results: RunResults, files: Sequence[Path], name: str, folder: str = ".") -> None:
        from torch.utils.tensorboard import SummaryWriter

        directory = self.root / folder
        directory.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(directory))
        try:
            writer.add_text("config", "```json\n" + json.dumps(results.config, indent=1) + "\n```", 0)
            writer.add_text("parameters", "\n".join(f"- {k}: {v}" for k, v in parameters(results).items()), 0)
            for metric, value, step in metrics(results):
                writer.add_scalar(metric, value, step)
        finally:
            writer.close()
        for file in files:  # results.json (and its CSVs) with the events: TensorBoard has no artifacts
            shutil.copyfile(file, directory / Path(file).name)

    def finish(self, summary: Mapping[str, Any] | None = None, files: Sequence[Path] = ()) -> None:
        """Nothing to close: every writer is closed after its run, and a sweep's summary sits above ``root``."""


class MlflowTracker(Tracker):
    """MLflow runs in MLflow's configured store; with ``parent``, every run is nested under one parent run."""

    def __init__(self, parent: str | None = None, parent_params: Mapping[str, Any] | None = None):
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient()
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
            found = self.client.get_experiment_by_name(name)
            self.experiment = found.experiment_id if found else self.client.create_experiment(name)
            self.parent = None
            if parent is not None:
                run = self.client.create_run(self.experiment, run_name=parent)
                self.parent = run.info.run_id
                for key, value in (parent_params or {}).items():
                    self.client.log_param(self.parent, clean_name(key), _param(value))
        except ImportError as exc:  # the store needs a package (sqlite: sqlalchemy and alembic)
            raise MergingError(f"--tracker mlflow: MLflow's store needs {exc.name}: pip install mlflow") from None
        except Exception as exc:  # a store MLflow refuses (a file store without MLFLOW_ALLOW_FILE_STORE, say)
            raise MergingError(f"--tracker mlflow: {' '.join(str(exc).split())}") from None

    def log_run(self, results: RunResults, files: Sequence[Path], name: str, folder: str = ".") -> None:
        from mlflow.entities import Metric, Param

        tags = {"mlflow.parentRunId": self.parent} if self.parent else {}
        tags["tasks"] = ",".join(results.tasks)
        run = self.client.create_run(self.experiment, run_name=name, tags=tags).info.run_id
        try:
            params = [Param(k, _param(v)) for k, v in parameters(results).items()]
            values = [Metric(k, v, 0, s) for k, v, s in metrics(results)]
            for start in range(0, len(values), 1000):  # MLflow's batch limit
                self.client.log_batch(run, metrics=values[start : start + 1000], params=params if start == 0 else [])
            if not values:
                self.client.log_batch(run, params=params)
            for file in files:
                self.client.log_artifact(run, str(file))
        finally:
            self.client.set_terminated(run)

    def finish(self, summary: Mapping[str, Any] | None = None, files: Sequence[Path] = ()) -> None:
        if self.parent is None:
            return
        try:
            for name, row in (summary or {}).get("methods", {}).items():
                for key in ("acc_mean", "acc_std", "bwt_mean", "bwt_std"):
                    if row.get(key) is not None:
                        self.client.log_metric(self.parent, clean_name(f"{name}/{key}"), row[key])
            for file in files:
                self.client.log_artifact(self.parent, str(file))
        finally:
            self.client.set_terminated(self.parent)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:500]  # the oldest stores' limit on a parameter's value


def open_tracker(
    kind: str, tensorboard_root: Path, group: str | None = None, group_params: Mapping[str, Any] | None = None
) -> Tracker:
    """A tracker of ``kind``; ``group`` names a sweep, whose trials are grouped (an MLflow parent run)."""
    check_tracker(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(tensorboard_root)
    return MlflowTracker(group, group_params)
