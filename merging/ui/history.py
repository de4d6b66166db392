"""A session's run history: every run of the page kept (up to a bound) with its configuration.

The history lives in the session's ``gr.State`` on the server, so sessions never see each other's
runs and a script cannot write into it. Each entry is the run's results as JSON without the live
analysis (spectra and sketches are the bulk of results.json and the overlay needs only the
accuracies), so a session holds at most :data:`MAX_RUNS` small records, whatever its runs were.
The zip of every run is written only into the session's own workspace folder.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merging.errors import MergingError
from merging.experiment.results import RunResults
from merging.ui import plots

MAX_RUNS = 12  # per session; the oldest goes first
HISTORY_HEADERS = ["run", "method", "options", "tasks", "steps", "order seed", "ACC (%)", "BWT (%)"]
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def entries(history: Any) -> list[dict[str, Any]]:
    """The history as the state holds it, checked: a list of at most MAX_RUNS records (else empty)."""
    if not isinstance(history, list):
        return []
    return [h for h in history if isinstance(h, dict) and isinstance(h.get("results"), dict)][-MAX_RUNS:]


def record(history: Any, results: Any) -> list[dict[str, Any]]:
    """The history with this run added (or updated, when it is the same run seen again after Stop).

    A run without a completed step is not kept. Runs are told apart by their downloads folder
    (one per run); the number a run gets is never reused in the session."""
    runs = entries(history)
    try:
        typed = RunResults.from_json(results) if isinstance(results, dict) and results else None
    except MergingError:
        typed = None
    if typed is None or not typed.completed_steps:
        return runs
    compact = typed.to_json()
    compact.pop("analysis", None)
    key = typed.downloads or json.dumps(compact, sort_keys=True, default=str)[:2000]
    for run in runs:
        if run["key"] == key:
            run["results"] = compact
            return runs
    number = max((int(r.get("number", 0)) for r in runs), default=0) + 1
    runs.append({"number": number, "key": key, "label": label_of(number, typed), "results": compact})
    return runs[-MAX_RUNS:]


def label_of(number: int, results: RunResults) -> str:
    """ "#3 opcm, task_arithmetic · mini-8 · seed 42 · 8/8" — what a run is, in one line."""
    config = results.config
    methods = ", ".join(
        name + "".join(f" {k}={v}" for k, v in sorted(m.options.items())) for name, m in results.methods.items()
    )
    parts = [f"#{number} {methods}", str(config.get("preset") or f"{len(results.tasks)} tasks")]
    if config.get("order_seed") is not None:
        parts.append(f"seed {config['order_seed']}")
    parts.append(f"{results.completed_steps}/{results.total_steps}")
    return " · ".join(parts)


def labels(history: Any) -> list[str]:
    return [run["label"] for run in entries(history)]


def table(history: Any) -> pd.DataFrame:
    """One row per run and method: what it was (options, tasks, order seed) and its ACC and BWT."""
    rows = []
    for run in entries(history):
        typed = RunResults.from_json(run["results"])
        for name, method in typed.methods.items():
            options = ", ".join(f"{k}={v}" for k, v in sorted(method.options.items())) or "defaults"
            rows.append(
                [
                    f"#{run['number']}",
                    name,
                    options,
                    len(typed.tasks),
                    typed.completed_steps,
                    typed.config.get("order_seed"),
                    None if not method.steps else 100 * (method.acc or 0.0),
                    None if method.bwt is None else 100 * method.bwt,
                ]
            )
    return pd.DataFrame(rows, columns=HISTORY_HEADERS)


def styled_table(frame: pd.DataFrame) -> Any:
    """Percentages with one decimal, BWT signed, empty cells blank."""
    return frame.style.format({"ACC (%)": "{:.1f}", "BWT (%)": "{:+.1f}", "order seed": "{:.0f}"}, na_rep="")


def overlay_figure(history: Any, chosen: Sequence[str] | None = None) -> go.Figure | None:
    """ACC over the seen tasks and BWT against the step for the chosen runs (all when none is
    chosen): a colour per run, a dash per method, so two orders or two α read side by side."""
    runs = entries(history)
    wanted = set(chosen or [])
    runs = [r for r in runs if not wanted or r["label"] in wanted]
    if not runs:
        return None
    figure = make_subplots(rows=1, cols=2, subplot_titles=("ACC over seen tasks (%)", "BWT (%)"))
    method_names: list[str] = []
    for run in runs:
        typed = RunResults.from_json(run["results"])
        for name, method in typed.methods.items():
            if name not in method_names:
                method_names.append(name)
            style = dict(color=plots.colour(run["number"] - 1), dash=DASHES[method_names.index(name) % len(DASHES)])
            acc = [100 * a for a in method.acc_per_step]
            bwt = [None if b is None else 100 * b for b in method.bwt_per_step]
            label = f"#{run['number']} {name}"
            x = list(range(1, len(acc) + 1))
            figure.add_trace(
                go.Scatter(x=x, y=acc, name=label, mode="lines+markers", line=style, legendgroup=label), 1, 1
            )
            figure.add_trace(
                go.Scatter(
                    x=x, y=bwt, name=label, mode="lines+markers", line=style, legendgroup=label, showlegend=False
                ),
                1,
                2,
            )
    figure.update_xaxes(title_text="step", dtick=1)
    return plots.styled(figure, "Runs of this session: ACC and BWT after each step")


def write_zip(history: Any, folder: Path) -> Path:
    """Every run of the history as ``run-N/results.json`` and ``run-N/config.json`` (replayable with
    ``python -m merging run --config``) plus ``runs.csv`` (the table), zipped into ``folder`` —
    the session's own workspace folder, which the caller takes from :class:`~merging.ui.hosting.Workspaces`."""
    runs = entries(history)
    if not runs:
        raise MergingError("no run to download yet: run something first")
    target = folder / "runs.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for run in runs:
            name = f"run-{int(run['number']):02d}"
            archive.writestr(f"{name}/results.json", json.dumps(run["results"], indent=1) + "\n")
            archive.writestr(f"{name}/config.json", json.dumps({"config": run["results"]["config"]}, indent=1) + "\n")
        archive.writestr("runs.csv", table(runs).to_csv(index=False))
    return target
