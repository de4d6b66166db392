"""Plotly figures of a continual run, as pure functions of its results (results.json's structure).

Every figure keeps ``uirevision`` constant, so a user's zoom survives the live updates, and
prints accuracies in percent. Nothing here reads files or holds models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .tasks import ASSETS

UIREVISION = "continual-merging-lab"
COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
# our method names → the keys of assets/reference/reference_results.json
PUBLISHED_NAMES = {
    "opcm": "opcm",
    "task_arithmetic": "continual_task_arithmetic",
    "ties": "continual_ties",
    "weight_average": "weight_average",
    "magmax": "magmax",
}
PUBLISHED_BACKBONES = {
    "ViT-B-32": "ViT-B/32",
    "openai/clip-vit-base-patch32": "ViT-B/32",
    "ViT-B-16": "ViT-B/16",
    "openai/clip-vit-base-patch16": "ViT-B/16",
    "ViT-L-14": "ViT-L/14",
    "openai/clip-vit-large-patch14": "ViT-L/14",
}
PRESET_SIZES = {"TA8": "8", "TALL14": "14", "TALL20": "20"}
TABLE_HEADERS = ["method", "ACC (%)", "BWT (%)", "merge s/step", "eval s/step"]


def colour(index: int) -> str:
    return COLOURS[index % len(COLOURS)]


def accuracy_matrix(results: Mapping[str, Any], method: str, field: str = "accuracy") -> list[list[float | None]]:
    """a[i][t] in percent (None where not evaluated), tasks in merge order."""
    columns = results["methods"][method][field]
    return [[None if task not in c else 100 * c[task] for c in columns] for task in results["tasks"]]


def _step_labels(results: Mapping[str, Any], steps: int) -> list[str]:
    return [f"{t + 1}: +{results['tasks'][t]}" for t in range(steps)]


def _styled(figure: go.Figure, title: str, height: int = 360) -> go.Figure:
    figure.update_layout(
        title=title,
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        uirevision=UIREVISION,
        legend=dict(orientation="h", yanchor="bottom", y=-0.35, x=0),
        template="plotly_white",
    )
    return figure


def accuracy_heatmap(results: Mapping[str, Any], method: str) -> go.Figure:
    """Tasks × steps heatmap of one method's accuracy matrix, values printed in the cells."""
    matrix = accuracy_matrix(results, method)
    steps = len(results["methods"][method]["accuracy"])
    figure = go.Figure(
        go.Heatmap(
            z=matrix,
            x=_step_labels(results, steps),
            y=list(results["tasks"]),
            zmin=0,
            zmax=100,
            colorscale="Viridis",
            texttemplate="%{z:.1f}",
            hovertemplate="%{y} after step %{x}: %{z:.1f}%<extra></extra>",
            colorbar=dict(title="%"),
        )
    )
    figure.update_yaxes(autorange="reversed")
    return _styled(figure, f"{method}: accuracy on each task after each step", height=120 + 28 * len(matrix))


@lru_cache(maxsize=1)
def published_results() -> dict[str, Any]:
    path = ASSETS / "reference" / "reference_results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def published_markers(config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Published final ACC/BWT per method for a standard preset on an OpenAI backbone, else {}."""
    backbone = PUBLISHED_BACKBONES.get(str(config.get("backbone")))
    size = PRESET_SIZES.get(str(config.get("preset")))
    if backbone is None or size is None:
        return {}
    data = published_results()
    markers: dict[str, dict[str, float]] = {}
    for ours, theirs in PUBLISHED_NAMES.items():
        for metric in ("ACC", "BWT"):
            value = data.get(metric, {}).get(backbone, {}).get(size, {}).get(theirs)
            if value is not None:
                markers.setdefault(ours, {})[metric] = float(value)
    return markers


def _reference_curve(results: Mapping[str, Any], row: str, steps: int) -> list[float]:
    values = results["reference"][row]
    tasks = results["tasks"]
    return [100 * sum(values[t] for t in tasks[: s + 1]) / (s + 1) for s in range(steps)]


def acc_bwt_figure(results: Mapping[str, Any]) -> go.Figure:
    """ACC over the seen tasks and BWT against the step, a line per method, with reference lines."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("ACC over seen tasks (%)", "BWT (%)"))
    steps = max((len(m["accuracy"]) for m in results["methods"].values()), default=0)
    x = list(range(1, steps + 1))
    if steps and results.get("reference"):
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
    markers = published_markers(results.get("config", {}))
    total = len(results["config"]["checkpoints"]) if "config" in results else steps
    for index, (name, data) in enumerate(results["methods"].items()):
        acc = [100 * a for a in data["acc_per_step"]]
        bwt = [None if b is None else 100 * b for b in data["bwt_per_step"]]
        style = dict(color=colour(index))
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
                        marker=dict(symbol="star", size=13, color=colour(index)),
                        legendgroup=name,
                        showlegend=col == 1,
                    ),
                    row=1,
                    col=col,
                )
    figure.update_xaxes(title_text="step", dtick=1)
    return _styled(figure, "Average accuracy and backward transfer as tasks arrive")


def per_task_curves(results: Mapping[str, Any], method: str) -> go.Figure:
    """One line per task: its accuracy from the step it entered on, so forgetting shows."""
    matrix = accuracy_matrix(results, method)
    figure = go.Figure()
    for index, (task, row) in enumerate(zip(results["tasks"], matrix, strict=True)):
        points = [(t + 1, v) for t, v in enumerate(row) if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            figure.add_trace(go.Scatter(x=xs, y=ys, name=task, mode="lines+markers", line=dict(color=colour(index))))
    figure.update_xaxes(title_text="step", dtick=1)
    figure.update_yaxes(title_text="accuracy (%)")
    return _styled(figure, f"{method}: each task's accuracy as later tasks are merged")


def cosine_heatmap(similarity: Sequence[Sequence[float]], names: Sequence[str]) -> go.Figure:
    figure = go.Figure(
        go.Heatmap(
            z=[list(map(float, row)) for row in similarity],
            x=list(names),
            y=list(names),
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            reversescale=True,
            texttemplate="%{z:.2f}",
        )
    )
    figure.update_yaxes(autorange="reversed")
    return _styled(figure, "Cosine similarity of task vectors (and the merged delta)", height=160 + 26 * len(names))


def spectrum_figure(spectra: Mapping[str, Sequence[float]], layer: str, alpha: float | None = None) -> go.Figure:
    """Singular values and the normalised cumulative spectrum of one layer, with OPCM's α cut.

    The cumulative curve is :func:`merging.analysis.cumulative_share`, the share OPCM's split
    cuts at α, so the dashed line meets the curve where the merge made its cut. Torch is
    imported here, not at the top, so that loading the figures stays free of it.
    """
    import torch

    from .analysis import cumulative_share

    figure = make_subplots(rows=1, cols=2, subplot_titles=("singular values", "normalised cumulative spectrum"))
    for index, (name, values) in enumerate(spectra.items()):
        values = [float(v) for v in values]
        cumulative = cumulative_share(torch.tensor(values, dtype=torch.float64)).tolist()
        style = dict(color=colour(index))
        figure.add_trace(go.Scatter(y=values, name=name, mode="lines", line=style, legendgroup=name), row=1, col=1)
        figure.add_trace(
            go.Scatter(y=cumulative, name=name, mode="lines", line=style, legendgroup=name, showlegend=False),
            row=1,
            col=2,
        )
    if alpha is not None:
        figure.add_hline(y=alpha, line=dict(dash="dash", color="#444"), row=1, col=2, annotation_text=f"α = {alpha:g}")
    figure.update_yaxes(type="log", row=1, col=1)
    return _styled(figure, f"Spectra of {layer}")


def opcm_lambda_figure(results: Mapping[str, Any], method: str = "opcm") -> go.Figure:
    """OPCM's λ(t) against √t, and the share of each new task vector the projection removed."""
    steps = results["methods"][method]["steps"]
    x = list(range(1, len(steps) + 1))
    figure = make_subplots(rows=1, cols=2, subplot_titles=("λ(t) and √t", "share of τ_t removed by the projection"))
    lam = [s["diagnostics"].get("lambda") for s in steps]
    figure.add_trace(go.Scatter(x=x, y=lam, name="λ(t)", mode="lines+markers", line=dict(color=colour(0))), 1, 1)
    figure.add_trace(
        go.Scatter(x=x, y=[math.sqrt(t) for t in x], name="√t", mode="lines", line=dict(color="#999", dash="dash")),
        1,
        1,
    )
    removed = [s["diagnostics"].get("removed_share") for s in steps]
    figure.add_trace(go.Bar(x=x, y=removed, name="removed share", marker_color=colour(1)), 1, 2)
    figure.update_xaxes(title_text="step", dtick=1)
    return _styled(figure, "OPCM internals")


def otmf_figure(results: Mapping[str, Any], method: str = "otmf") -> go.Figure:
    """OTMF's loss curves of both mask sets per merge step, and the masks' statistics per step."""
    figure = make_subplots(
        rows=1, cols=3, subplot_titles=("pre masks: OT loss", "post masks: OT loss", "masks: mean ± std, tails")
    )
    steps = results["methods"][method]["steps"]
    for index, step in enumerate(steps):
        diagnostics = step["diagnostics"]
        for col, key in ((1, "loss_pre"), (2, "loss_post")):
            if diagnostics.get(key):
                figure.add_trace(
                    go.Scatter(
                        y=diagnostics[key],
                        name=f"step {index + 1}",
                        mode="lines",
                        line=dict(color=colour(index)),
                        legendgroup=str(index),
                        showlegend=col == 1,
                    ),
                    row=1,
                    col=col,
                )
    for offset, which in ((0, "pre"), (1, "post")):
        points = [(t + 1, s["diagnostics"]["masks"][which]) for t, s in enumerate(steps) if "masks" in s["diagnostics"]]
        if not points:
            continue
        x = [t for t, _ in points]
        figure.add_trace(
            go.Scatter(
                x=x,
                y=[m["mean"] for _, m in points],
                error_y=dict(array=[m["std"] for _, m in points]),
                name=f"{which} mask mean ± std",
                mode="markers+lines",
                line=dict(color=colour(6 + offset)),
            ),
            row=1,
            col=3,
        )
        figure.add_trace(
            go.Bar(
                x=x,
                y=[m["below_0.5"] + m["above_1.5"] for _, m in points],
                name=f"{which}: share < 0.5 or > 1.5",
                marker_color=colour(4 + offset),
                opacity=0.5,
            ),
            row=1,
            col=3,
        )
    figure.update_xaxes(title_text="update", row=1, col=1)
    figure.update_xaxes(title_text="update", row=1, col=2)
    figure.update_xaxes(title_text="step", dtick=1, row=1, col=3)
    return _styled(figure, "OTMF internals")


def internals(results: Mapping[str, Any]) -> tuple[go.Figure | None, go.Figure | None]:
    """The live method-internals figures: OPCM's and OTMF's, when they ran and have steps."""
    methods = results.get("methods", {})
    opcm = opcm_lambda_figure(results) if methods.get("opcm", {}).get("steps") else None
    otmf = otmf_figure(results) if methods.get("otmf", {}).get("steps") else None
    return opcm, otmf


def results_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """The results table: method, ACC, BWT, mean merge and evaluation seconds per step (reference rows first)."""
    rows = []
    seen = max((len(m["accuracy"]) for m in results["methods"].values()), default=0)
    tasks = results["tasks"][:seen] if seen else results["tasks"]  # before any step: the whole list
    reference = results.get("reference") or {}
    for row in ("pretrained", "finetuned"):
        if row in reference and tasks:
            rows.append([row, round(100 * sum(reference[row][t] for t in tasks) / len(tasks), 2), None, None, None])
    for name, data in results["methods"].items():
        steps = data["steps"]
        if not steps:
            continue
        rows.append(
            [
                name,
                round(100 * data["acc"], 2),
                None if data["bwt"] is None else round(100 * data["bwt"], 2),
                round(sum(s["merge_seconds"] for s in steps) / len(steps), 3),
                round(sum(s["eval_seconds"] for s in steps) / len(steps), 3),
            ]
        )
    return pd.DataFrame(rows, columns=TABLE_HEADERS)
