"""Plotly figures of a continual run, as pure functions of its typed results (:mod:`merging.experiment.results`).

A method's own "internals" figure is drawn by the method (``live_figure``); this module
names no method. Every figure keeps ``uirevision`` constant, so a user's zoom survives the live updates, and
prints accuracies in percent. Nothing here reads files or holds models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merging.evaluation.published import config_setting, published_numbers
from merging.experiment.results import RunResults

UIREVISION = "continual-merging-lab"
# Paul Tol's 23-colour discrete rainbow (personal.sron.nl/~pault, designed to stay distinguishable
# for colour-blind readers), less its near-white first colour, ordered for categories: greedily
# farthest (CIELAB) from those already taken, the four pale ones last (they read worst on white).
# 22 colours, so 20 tasks never share one (the 8 of before made mini-digits and mini-counts
# the same blue); tests/test_plots.py checks that every pair differs (CIELAB distance >= 10).
COLOURS = (
    "#1965B0",
    "#DC050C",
    "#4EB265",
    "#42150A",
    "#F4A736",
    "#882E72",
    "#CAACCB",
    "#7BAFDE",
    "#AA6F9E",
    "#A5170E",
    "#72190E",
    "#E65518",
    "#EE8026",
    "#90C987",
    "#994F88",
    "#BA8DB4",
    "#6195CF",
    "#437DBF",
    "#F7F056",
    "#F7CB45",
    "#CAE0AB",
    "#D9CCE3",
)
# Methods have a palette of their own (Tol's "muted"), fixed by their place in the registry, so a
# method keeps its colour in every plot and every run, and never takes a task's colour.
METHOD_COLOURS = ("#332288", "#CC6677", "#117733", "#DDCC77", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499")
# Beside colour, a second cue for lines (colour-blind readers, grey print): a marker per task.
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "triangle-down", "cross", "star", "pentagon", "hexagon")
TITLE_CHARS = 44  # a longer title wraps onto a second line (a 330 px phone-wide plot fits this many at 12 px)
TABLE_HEADERS = ["method", "ACC (%)", "BWT (%)", "merge s/step", "eval s/step"]


def colour(index: int) -> str:
    """The ``index``-th categorical colour (tasks by their place in the run's order)."""
    return COLOURS[index % len(COLOURS)]


def task_colour(results: RunResults, task: str) -> str:
    """A task's colour: the same in every plot of a run (its place in the merge order)."""
    return colour(results.tasks.index(task)) if task in results.tasks else "#777777"


def task_symbol(results: RunResults, task: str) -> str:
    return SYMBOLS[results.tasks.index(task) % len(SYMBOLS)] if task in results.tasks else "circle"


def method_colour(name: str) -> str:
    """A method's colour, fixed by its place in the registry (so runs overlay consistently)."""
    from merging.methods import METHODS

    names = list(METHODS)
    index = names.index(name) if name in names else len(names) + sum(map(ord, name))
    return METHOD_COLOURS[index % len(METHOD_COLOURS)]


def wrap_title(title: str, width: int = TITLE_CHARS) -> str:
    """Break a long title at spaces into lines of at most ``width`` characters (plotly never wraps)."""
    import textwrap

    return "<br>".join(textwrap.wrap(title, width, break_long_words=False, break_on_hyphens=False)) or title


def log_ticks(values: Sequence[float]) -> tuple[list[float], list[str]] | None:
    """Tick values and labels for a log axis over ``values``: 1, 2, 5 × 10^k in range (only 10^k over
    more than three decades), each labelled in full ("0.02", "1e-05"), instead of plotly's bare
    leading digits ("5, 2, 0.1, 5, 2")."""
    import math

    positive = [float(v) for v in values if v is not None and float(v) > 0]
    if not positive:
        return None
    low, high = min(positive), max(positive)
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    steps = (1,) if last - first > 3 else (1, 2, 5)
    ticks = [m * 10.0**k for k in range(first, last + 1) for m in steps]
    inside = [t for t in ticks if low / 1.001 <= t <= high * 1.001]
    if len(inside) < 2:  # a narrow range: the ticks either side too
        below = [t for t in ticks if t < low][-1:]
        above = [t for t in ticks if t > high][:1]
        inside = below + inside + above
    return inside, [f"{t:.3g}" for t in inside]


def accuracy_matrix(results: RunResults, method: str) -> list[list[float | None]]:
    """a[i][t] in percent (None where not evaluated), every task of the run in merge order."""
    matrix = results.methods[method].matrix(all_tasks=True)
    return [[None if v is None else 100 * v for v in row] for row in matrix]


def _step_labels(results: RunResults, steps: int) -> list[str]:
    """Step numbers as category labels: short, so 20 of them fit side by side unrotated (the task
    that entered is in the hover text and the y labels)."""
    return [str(t + 1) for t in range(steps)]


def _entered(results: RunResults, steps: int) -> list[str]:
    return [results.tasks[t] if t < len(results.tasks) else "" for t in range(steps)]


def styled(figure: go.Figure, title: str, height: int = 360) -> go.Figure:
    """The lab's look (and a constant ``uirevision``, so a user's zoom survives live updates).

    The legend sits below the whole figure, in the container's coordinates, so plotly reserves
    room for it under the axis titles instead of drawing it over them (tested in the browser);
    a long title wraps onto a second line rather than being cut at the plot's edge.
    """
    text = wrap_title(title)
    lines = text.count("<br>") + 1
    figure.update_layout(
        title=dict(text=text, x=0.01, xanchor="left", font=dict(size=14)),
        height=height + 18 * (lines - 1),
        margin=dict(l=10, r=10, t=30 + 18 * lines, b=10),
        uirevision=UIREVISION,
        legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, xanchor="left"),
        template="plotly_white",
    )
    figure.update_xaxes(automargin=True)
    figure.update_yaxes(automargin=True)
    return figure


def title_text(figure: go.Figure) -> str:
    """A figure's title as one line of plain text (:func:`styled` may have wrapped it)."""
    return (figure.layout.title.text or "").replace("<br>", " ")


def accuracy_heatmap(results: RunResults, method: str) -> go.Figure:
    """Tasks × steps heatmap of one method's accuracy matrix, values printed in the cells."""
    matrix = accuracy_matrix(results, method)
    steps = len(results.methods[method].steps)
    figure = go.Figure(_accuracy_trace(results, matrix, steps))
    figure.update_yaxes(autorange="reversed")
    figure.update_xaxes(title_text="step", type="category")
    return styled(figure, f"{method}: accuracy on each task after each step", height=_matrix_height(len(matrix)))


def _matrix_height(rows: int) -> int:
    return 150 + (28 if rows <= 12 else 20) * rows


def _accuracy_trace(
    results: RunResults,
    matrix: Sequence[Sequence[float | None]],
    steps: int,
    zmin: float = 0,
    zmax: float = 100,
    colorscale: str = "Viridis",
    unit: str = "%",
    showscale: bool = True,
    **extra: Any,
) -> go.Heatmap:
    """A tasks × steps heatmap trace: values in the cells (one decimal) while they fit (≤ 12 tasks)."""
    small = len(matrix) <= 12
    return go.Heatmap(
        z=[list(row[:steps]) for row in matrix],
        x=_step_labels(results, steps),
        y=list(results.tasks),
        customdata=[_entered(results, steps)] * len(matrix),
        zmin=zmin,
        zmax=zmax,
        colorscale=colorscale,
        texttemplate="%{z:.1f}" if small else None,
        textfont=dict(size=11 if small else 9),
        hovertemplate="%{y} after step %{x} (+%{customdata}): %{z:.1f}" + unit + "<extra></extra>",
        colorbar=dict(title=unit),
        showscale=showscale,
        **extra,
    )


def published_markers(config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Published final ACC/BWT per method for a standard preset on an OpenAI backbone, else {}.

    Each method says under which name the papers report it (``published_name``)."""
    from merging.methods import METHODS

    setting = config_setting(config)
    return {} if setting is None else published_numbers(setting, METHODS)


def _reference_curve(results: RunResults, row: str, steps: int) -> list[float]:
    values = results.reference[row]
    tasks = results.tasks
    return [100 * sum(values[t] for t in tasks[: s + 1]) / (s + 1) for s in range(steps)]


def acc_bwt_figure(results: RunResults) -> go.Figure:
    """ACC over the seen tasks and BWT against the step, a line per method, with reference lines."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("ACC over seen tasks (%)", "BWT (%)"))
    steps = results.completed_steps
    x = list(range(1, steps + 1))
    if steps and results.reference:
        for row, dash in (("pretrained", "dot"), ("finetuned", "dash")):
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=_reference_curve(results, row, steps),
                    name=f"{row} (mean over seen)",
                    mode="lines",
                    line=dict(color="#999", dash=dash),
                ),
                row=1,
                col=1,
            )
    markers = published_markers(results.config)
    total = results.total_steps
    for name, data in results.methods.items():
        acc = [100 * a for a in data.acc_per_step]
        bwt = [None if b is None else 100 * b for b in data.bwt_per_step]
        style = dict(color=method_colour(name))
        figure.add_trace(
            go.Scatter(x=x[: len(acc)], y=acc, name=name, mode="lines+markers", line=style, legendgroup=name),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Scatter(
                x=x[: len(bwt)], y=bwt, name=name, mode="lines+markers", line=style, legendgroup=name, showlegend=False
            ),
            row=1,
            col=2,
        )
        for col, metric in ((1, "ACC"), (2, "BWT")):
            if metric in markers.get(name, {}):
                figure.add_trace(
                    go.Scatter(
                        x=[total],
                        y=[markers[name][metric]],
                        name=f"{name} (published)",
                        mode="markers",
                        marker=dict(symbol="star", size=13, color=method_colour(name)),
                        legendgroup=name,
                        showlegend=col == 1,
                    ),
                    row=1,
                    col=col,
                )
    figure.update_xaxes(title_text="step", dtick=1)
    return styled(figure, "ACC and BWT after each step")


def per_task_curves(results: RunResults, method: str) -> go.Figure:
    """One line per task: its accuracy from the step it entered on, so forgetting shows."""
    matrix = accuracy_matrix(results, method)
    figure = go.Figure()
    for index, (task, row) in enumerate(zip(results.tasks, matrix, strict=True)):
        points = [(t + 1, v) for t, v in enumerate(row) if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            figure.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    name=task,
                    mode="lines+markers",
                    line=dict(color=colour(index)),
                    marker=dict(symbol=SYMBOLS[index % len(SYMBOLS)]),
                )
            )
    figure.update_xaxes(title_text="step", dtick=1)
    figure.update_yaxes(title_text="accuracy (%)")
    return styled(figure, f"{method}: each task's accuracy as later tasks arrive")


def short_name(name: str) -> str:
    """A column label that fits under a narrow cell: "τ3 sun397" → "τ3", "merged opcm" → "opcm"."""
    if name.startswith("τ"):
        return name.split(" ")[0]
    return name.removeprefix("merged ")


def cosine_heatmap(similarity: Sequence[Sequence[float]], names: Sequence[str]) -> go.Figure:
    """Cosines between task vectors (and merged deltas): full names down the side, short ones
    (τ1, τ2, …, the method) across, unrotated, so 20 tasks stay legible; values in the cells up to 12."""
    small = len(names) <= 12
    cells = len(names) <= 6  # two decimals need a cell about 30 px wide: a half-width plot fits six
    figure = go.Figure(
        go.Heatmap(
            z=[list(map(float, row)) for row in similarity],
            x=[short_name(n) for n in names],
            y=list(names),
            customdata=[list(names)] * len(names),
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            reversescale=True,
            texttemplate="%{z:.2f}" if cells else None,
            textfont=dict(size=11),
            hovertemplate="%{y} · %{customdata}: %{z:.3f}<extra></extra>",
        )
    )
    figure.update_yaxes(autorange="reversed")
    figure.update_xaxes(tickangle=0, type="category")
    return styled(
        figure,
        "Cosine similarity of task vectors (and the merged delta)",
        height=160 + (26 if small else 18) * len(names),
    )


def spectrum_figure(
    spectra: Mapping[str, Sequence[float]],
    layer: str,
    marks: Mapping[str, float] | None = None,
    cuts: Mapping[str, int] | None = None,
    title: str | None = None,
    colours: Mapping[str, str] | None = None,
) -> go.Figure:
    """Singular values and the normalised cumulative spectrum of one layer, with the methods' marks.

    The cumulative curve is :func:`merging.analysis.cumulative_share`, the share OPCM's split
    cuts at α, so a method's mark (``spectrum_marks``: OPCM's α) meets the curve where the merge
    made its cut. ``cuts`` (name → r) draw that cut on the singular values too: the r leading
    directions left of the line are the ones the cut keeps. Torch is imported here, not at the
    top, so that loading the figures stays free of it.
    """
    import torch

    from merging.analysis import cumulative_share

    figure = make_subplots(rows=1, cols=2, subplot_titles=("singular values", "cumulative share"))
    every = []
    for index, (name, values) in enumerate(spectra.items()):
        values = [float(v) for v in values]
        every += values
        cumulative = cumulative_share(torch.tensor(values, dtype=torch.float64)).tolist()
        style = dict(color=(colours or {}).get(name, colour(index)), dash="dash" if name.startswith("merged") else None)
        figure.add_trace(go.Scatter(y=values, name=name, mode="lines", line=style, legendgroup=name), row=1, col=1)
        figure.add_trace(
            go.Scatter(y=cumulative, name=name, mode="lines", line=style, legendgroup=name, showlegend=False),
            row=1,
            col=2,
        )
    for label, level in (marks or {}).items():
        figure.add_hline(
            y=level, line=dict(dash="dash", color="#444"), row=1, col=2, annotation_text=f"{label} = {level:g}"
        )
    for label, rank in (cuts or {}).items():
        figure.add_vline(
            x=rank - 0.5, line=dict(dash="dot", color="#444"), row=1, col=1, annotation_text=f"{label}: r = {rank}"
        )
    ticks = log_ticks(every)
    figure.update_yaxes(type="log", row=1, col=1)
    if ticks is not None:
        figure.update_yaxes(tickvals=ticks[0], ticktext=ticks[1], row=1, col=1)
    figure.update_xaxes(title_text="index")
    return styled(figure, title or f"Spectra of {layer}")


def spectrum_marks(results: RunResults) -> dict[str, dict[str, float]]:
    """Per method of the run, the levels it cuts the cumulative spectrum at (OPCM: α), from its options."""
    from merging.methods import METHODS

    return {
        name: dict(METHODS[name].spectrum_marks(method.options))
        for name, method in results.methods.items()
        if name in METHODS and METHODS[name].spectrum_marks(method.options)
    }


def spectra_with_cuts(
    spectra: Mapping[str, Sequence[float]], merged: Mapping[str, str], marks: Mapping[str, Mapping[str, float]]
) -> tuple[dict[str, float], dict[str, int]]:
    """The marks to draw (``"opcm α"`` → level) and where each cuts its own method's merged curve.

    ``merged`` maps a method to its curve's name in ``spectra``. The cut is the number of leading
    singular values whose cumulative share is ≤ the level (:func:`merging.analysis.cumulative_share`,
    as OPCM's split counts them): the directions that method's next step protects.
    """
    import torch

    from merging.analysis import cumulative_share

    levels: dict[str, float] = {}
    cuts: dict[str, int] = {}
    for method, method_marks in marks.items():
        for mark, level in method_marks.items():
            label = f"{method} {mark}"
            levels[label] = level
            values = spectra.get(merged.get(method, ""))
            if values:
                exceeds = cumulative_share(torch.tensor([float(v) for v in values], dtype=torch.float64)) > level
                cuts[f"{label} = {level:g}"] = int(torch.argmax(exceeds.to(torch.int8))) if bool(exceeds.any()) else 0
    return levels, cuts


def live_cosine_figure(results: RunResults) -> go.Figure | None:
    """The live cosine heatmap after the last analysed step (None before the first)."""
    from merging.experiment.live_analysis import cosine_table

    if not results.analysis:
        return None
    table = cosine_table(results.analysis)
    figure = cosine_heatmap(table.values, table.names)
    last = results.analysis[-1]
    note = f" (τ·τ from a {last.sketch_dimension:,}-bucket sketch, ±0.01)" if table.sketched else ""
    rows = len(table.names)
    return styled(
        figure, f"Cosine similarity after step {last.step}{note}", height=160 + (26 if rows <= 12 else 18) * rows
    )


def live_spectrum_figure(results: RunResults) -> go.Figure | None:
    """The chosen layer's spectra after the last analysed step: the new task vector's and each
    merged delta's, with each method's cut (OPCM's α) on its own merged curve."""
    if not results.analysis:
        return None
    last = results.analysis[-1]
    spectra = {f"τ{last.step} {last.task}": last.task_spectrum}
    names = {m: f"merged {m}" for m in last.merged_spectra}
    spectra.update({names[m]: values for m, values in last.merged_spectra.items()})
    levels, cuts = spectra_with_cuts(spectra, names, spectrum_marks(results))
    title = f"Spectra of {last.layer_name} after step {last.step} (+{last.task})"
    return spectrum_figure(spectra, last.layer, levels, cuts, title=title, colours=spectrum_colours(results, spectra))


def spectrum_colours(results: RunResults, spectra: Mapping[str, Any]) -> dict[str, str]:
    """Each curve in its task's or method's colour ("τ3 sun397" is sun397's, "merged opcm" OPCM's)."""
    out = {}
    for name in spectra:
        if name.startswith("merged "):
            out[name] = method_colour(name.removeprefix("merged "))
        elif name.startswith("τ") and " " in name:
            out[name] = task_colour(results, name.split(" ", 1)[1])
    return out


def matrix_share_heatmap(results: RunResults, method: str, quantity: str = "removed_share") -> go.Figure | None:
    """Layers × steps heatmap of a per-matrix share a method reports in its ``matrices`` diagnostic
    (OPCM: the share of each matrix's task vector the projection removed), in percent; None if
    the method reports none. Rows are grouped by block, attention before the MLP."""
    from merging.experiment.live_analysis import layer_choices
    from merging.families.clip_vit.matrices import matrix_type

    if method not in results.methods:
        return None
    steps = results.methods[method].steps
    columns = [s.diagnostics.get("matrices") or {} for s in steps]
    labels = list(dict.fromkeys(label for column in columns for label in column))
    if not any(quantity in column.get(label, {}) for column in columns for label in labels):
        return None
    rows = layer_choices(labels, matrix_type)
    z = [
        [None if quantity not in column.get(label, {}) else 100 * float(column[label][quantity]) for column in columns]
        for _, label in rows
    ]
    figure = go.Figure(
        go.Heatmap(
            z=z,
            x=_step_labels(results, len(steps)),
            y=[name for name, _ in rows],
            customdata=[_entered(results, len(steps))] * len(rows),
            zmin=0,
            colorscale="Reds",
            hovertemplate="%{y} at step %{x} (+%{customdata}): %{z:.1f}%<extra></extra>",
            colorbar=dict(title="%"),
        )
    )
    figure.update_yaxes(autorange="reversed")
    figure.update_xaxes(title_text="step", type="category")
    pretty = quantity.replace("_", " ")
    height = 140 + (18 if len(rows) <= 24 else 12) * len(rows)
    return styled(figure, f"{method}: {pretty} of each layer's task vector, per step", height=height)


def internals_figure(results: RunResults, method: str) -> go.Figure | None:
    """The method's own live figure of its internals (None if it draws none or has no step yet)."""
    from merging.methods import METHODS

    if method not in results.methods or method not in METHODS:
        return None
    return METHODS[method].live_figure(results.methods[method])


def results_table(results: RunResults) -> pd.DataFrame:
    """The results table: method, ACC, BWT, mean merge and evaluation seconds per step (reference rows first)."""
    rows = []
    seen = results.completed_steps
    tasks = results.tasks[:seen] if seen else results.tasks  # before any step: the whole list
    for row in ("pretrained", "finetuned"):
        if row in results.reference and tasks:
            values = results.reference[row]
            rows.append([row, round(100 * sum(values[t] for t in tasks) / len(tasks), 2), None, None, None])
    for name, data in results.methods.items():
        steps = data.steps
        if not steps:
            continue
        rows.append(
            [
                name,
                round(100 * (data.acc or 0.0), 2),
                None if data.bwt is None else round(100 * data.bwt, 2),
                round(sum(s.merge_seconds for s in steps) / len(steps), 3),
                round(sum(s.eval_seconds for s in steps) / len(steps), 3),
            ]
        )
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


# Every number of a column printed with the same decimals (78.3 beside 78.5, a BWT of −2.0, not
# 78.3, 78.45 and -2): percentages with one decimal everywhere in the lab, BWT signed; the table
# keeps the numbers themselves, so it still sorts numerically.
TABLE_FORMATS = {"ACC (%)": "{:.1f}", "BWT (%)": "{:+.1f}", "merge s/step": "{:.3f}", "eval s/step": "{:.3f}"}


def styled_table(table: pd.DataFrame) -> Any:
    """The results table as the page shows it: fixed decimals per column, empty cells blank."""
    return table.style.format(TABLE_FORMATS, na_rep="")


# ------------------------------------------------------------------ comparing methods

COMPARE_VIEWS = ("matrices", "difference", "normalised")


def normalised_matrix(results: RunResults, method: str) -> list[list[float | None]]:
    """(acc − zero-shot) / (fine-tuned − zero-shot) per task and step, in percent: 0 is the pretrained
    model, 100 the task's own fine-tuned model. None where not evaluated, or where fine-tuning did
    not beat zero-shot (the ratio would have no meaning)."""
    pretrained = results.reference.get("pretrained") or {}
    finetuned = results.reference.get("finetuned") or {}
    out: list[list[float | None]] = []
    for task, row in zip(results.tasks, results.methods[method].matrix(all_tasks=True), strict=True):
        gap = finetuned.get(task, 0.0) - pretrained.get(task, 0.0)
        usable = task in pretrained and task in finetuned and gap > 1e-9
        out.append([None if v is None or not usable else 100 * (v - pretrained[task]) / gap for v in row])
    return out


def compare_figure(
    results: RunResults, view: str = "matrices", first: str | None = None, second: str | None = None
) -> go.Figure | None:
    """The methods of a run side by side: their accuracy matrices as small multiples on one colour
    scale ("matrices"), one method minus another in points ("difference", ``first`` − ``second``),
    or each matrix normalised by the run's reference rows ("normalised"). None before the first step."""
    names = [m for m in results.methods if results.methods[m].steps]
    if not names:
        return None
    steps = results.completed_steps
    if view == "difference":
        a = first if first in names else names[0]
        b = second if second in names else names[-1]
        left, right = accuracy_matrix(results, a), accuracy_matrix(results, b)
        diff = [
            [None if x is None or y is None else x - y for x, y in zip(ra, rb, strict=True)]
            for ra, rb in zip(left, right, strict=True)
        ]
        span = max([abs(v) for row in diff for v in row if v is not None] + [1.0])
        figure = go.Figure(
            _accuracy_trace(results, diff, steps, zmin=-span, zmax=span, colorscale="RdBu", unit=" points")
        )
        figure.update_yaxes(autorange="reversed")
        figure.update_xaxes(title_text="step", type="category")
        return styled(figure, f"{a} − {b} (accuracy points; blue: {a} ahead)", height=_matrix_height(len(diff)))
    normalised = view == "normalised"
    columns = min(len(names), 3)
    rows = -(-len(names) // columns)
    figure = make_subplots(
        rows=rows, cols=columns, subplot_titles=names, horizontal_spacing=0.04, vertical_spacing=0.12 / rows
    )
    for index, name in enumerate(names):
        matrix = normalised_matrix(results, name) if normalised else accuracy_matrix(results, name)
        trace = _accuracy_trace(
            results, matrix, steps, unit="% of the gap" if normalised else "%", showscale=index == 0
        )
        trace.update(texttemplate=None, coloraxis="coloraxis")
        figure.add_trace(trace, row=index // columns + 1, col=index % columns + 1)
    figure.update_layout(
        coloraxis=dict(colorscale="Viridis", cmin=0, cmax=100, colorbar=dict(title="%" if not normalised else "% gap"))
    )
    figure.update_yaxes(autorange="reversed")
    figure.update_yaxes(showticklabels=False)
    figure.update_yaxes(showticklabels=True, col=1)
    figure.update_xaxes(type="category")
    title = (
        "Normalised accuracy: (acc − zero-shot) / (fine-tuned − zero-shot)"
        if normalised
        else "Accuracy matrices of every method (tasks × steps)"
    )
    return styled(figure, title, height=rows * _matrix_height(len(results.tasks)) - (rows - 1) * 60)
