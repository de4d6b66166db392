"""Figures and the table of a sweep, as pure functions of its summary.json.

The papers read a sweep three ways, and so does the Sweep tab: how ACC and BWT spread over the
task orders for each row (box plots, every order a point), how a method's numbers move with an
option (sensitivity curves: the mean over the orders with the standard deviation as error bars),
and the table of mean ± std beside the published numbers. Everything here takes summary.json's
content (fractions in [0, 1]) and draws percent, in the lab's look (:func:`merging.ui.plots.styled`;
a method keeps its colour of every other plot, :func:`merging.ui.plots.method_colour`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merging.experiment.sweep import show_value, table
from merging.ui import plots

DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def _finished(row: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in row.get("runs", []) if r.get("acc") is not None]


def box_figure(summary: Mapping[str, Any]) -> go.Figure | None:
    """ACC and BWT over the orders, one box per row (every order a point; hover names its seed).

    Rows without a finished trial are left out; None before the first finished trial.
    """
    rows = {name: _finished(row) for name, row in summary.get("methods", {}).items()}
    rows = {name: runs for name, runs in rows.items() if runs}
    if not rows:
        return None
    figure = make_subplots(
        rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04, subplot_titles=("ACC (%)", "BWT (%)")
    )
    for name, runs in rows.items():
        method = summary["methods"][name].get("method", name.split("[")[0])
        seeds = [r["order_seed"] for r in runs]
        for column, key in ((1, "acc"), (2, "bwt")):
            values = [None if r.get(key) is None else 100 * r[key] for r in runs]
            figure.add_trace(
                go.Box(
                    x=values,
                    y=[name] * len(values),
                    name=name,
                    orientation="h",
                    boxpoints="all",
                    jitter=0.4,
                    pointpos=0,
                    customdata=seeds,
                    hovertemplate="%{y}, order seed %{customdata}: %{x:.1f}%<extra></extra>",
                    marker=dict(color=plots.method_colour(method), size=5),
                    line=dict(color=plots.method_colour(method)),
                    showlegend=False,
                ),
                1,
                column,
            )
    figure.update_yaxes(autorange="reversed", type="category")  # the plan's order, top to bottom
    orders = max(len(r) for r in rows.values())
    title = f"ACC and BWT over {orders} task order{'s' if orders != 1 else ''}, per row"
    return plots.styled(figure, title, height=140 + 34 * len(rows))


def grid_axes(summary: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each gridded method's option names, in the order of the grid (summary.json's ``config.grid``)."""
    grid = summary.get("config", {}).get("grid") or {}
    return {method: list(axes) for method, axes in grid.items() if axes}


def _options(row: Mapping[str, Any]) -> dict[str, Any]:
    runs = row.get("runs") or []
    return dict(runs[0].get("options", {})) if runs else {}


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def sensitivity_figure(summary: Mapping[str, Any]) -> go.Figure | None:
    """Per gridded method, ACC and BWT against its first grid option: the mean over the orders, the
    sample standard deviation as error bars; a line per combination of its other grid options.

    A numeric option gets a numeric axis, a choice (masks on/off, a projection) a categorical one.
    None when the sweep has no grid or no finished row of one.
    """
    axes = grid_axes(summary)
    lines: dict[str, dict[tuple[str, ...], list[tuple[Any, Mapping[str, Any]]]]] = {}
    for row in summary.get("methods", {}).values():
        method = row.get("method")
        if method not in axes or row.get("acc_mean") is None:
            continue
        options = _options(row)
        keys = axes[method]
        if any(k not in options for k in keys):
            continue
        others = tuple(f"{k}={show_value(options[k])}" for k in keys[1:])
        lines.setdefault(method, {}).setdefault(others, []).append((options[keys[0]], row))
    if not lines:
        return None
    methods = list(lines)
    titles = [f"{m}: {label} vs {axes[m][0]}" for m in methods for label in ("ACC (%)", "BWT (%)")]
    # room between rows for an x-axis title and the next row's subplot titles: about 110 px of 300 per row
    gap = 110 / (300 * len(methods)) if len(methods) > 1 else 0.0
    figure = make_subplots(rows=len(methods), cols=2, subplot_titles=titles, vertical_spacing=gap)
    for index, method in enumerate(methods, 1):
        key = axes[method][0]
        numeric = _numeric([x for points in lines[method].values() for x, _ in points])
        for number, (others, points) in enumerate(lines[method].items()):
            points = sorted(points, key=lambda p: p[0]) if numeric else points
            x = [p[0] if numeric else show_value(p[0]) for p in points]
            label = method + (f" ({', '.join(others)})" if others else "")
            style = dict(color=plots.method_colour(method), dash=DASHES[number % len(DASHES)])
            for column, metric in ((1, "acc"), (2, "bwt")):
                means = [None if row[f"{metric}_mean"] is None else 100 * row[f"{metric}_mean"] for _, row in points]
                stds = [0.0 if row[f"{metric}_std"] is None else 100 * row[f"{metric}_std"] for _, row in points]
                orders = [len(_finished(row)) for _, row in points]
                figure.add_trace(
                    go.Scatter(
                        x=x,
                        y=means,
                        error_y=dict(type="data", array=stds, visible=True, thickness=1.2, width=4),
                        customdata=list(zip(stds, orders, strict=True)),
                        hovertemplate=f"{key}=%{{x}}: %{{y:.1f}} ± %{{customdata[0]:.1f}}% over %{{customdata[1]}} "
                        "orders<extra>" + label + "</extra>",
                        name=label,
                        legendgroup=label,
                        showlegend=column == 1,
                        mode="lines+markers",
                        line=style,
                    ),
                    index,
                    column,
                )
        figure.update_xaxes(title_text=key, type=None if numeric else "category", row=index)
    return plots.styled(figure, "Sensitivity: mean ± std over the orders", height=60 + 300 * len(methods))


TABLE_HEADERS = ["method", "orders", "ACC (%)", "BWT (%)"]


def _cell(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return ""
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text if std is None else f"{text} ± {std:.1f}"


def table_frame(summary: Mapping[str, Any], references: Mapping[str, Mapping[str, float]] | None) -> pd.DataFrame:
    """The papers' table (the library's :func:`~merging.experiment.sweep.table`, as table.md has it):
    the reference rows, then mean ± std per row in percent, beside the published numbers."""
    label, rows = table(summary, references)
    headers = list(TABLE_HEADERS)
    if label:
        headers += [f"published ACC ({label})", "published BWT"]
    records = []
    for row in rows:
        cells = [row.name, "" if row.orders is None else str(row.orders)]
        cells += [_cell(row.acc_mean, row.acc_std), _cell(row.bwt_mean, row.bwt_std, signed=True)]
        if label:
            cells += [_cell(row.published_acc, None), _cell(row.published_bwt, None, signed=True)]
        records.append(cells)
    return pd.DataFrame(records, columns=headers)
