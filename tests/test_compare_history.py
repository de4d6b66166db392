"""The compare view (small multiples, difference, normalised) and the session's run history, at
function level and through the page's handlers, from results built by hand (as results.json holds them)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gradio as gr
import pytest

import app
from merging.experiment.results import RunResults
from merging.ui import history, plots
from merging.ui.hosting import Workspaces

TASKS = ["sun397", "stanford-cars", "resisc45"]


def results_json(second_method: bool = True, seed: int | None = None, downloads: str | None = None) -> dict:
    step = {"merge_seconds": 0.5, "eval_seconds": 1.0, "diagnostics": {}}
    opcm = [
        {"sun397": 0.9},
        {"sun397": 0.8, "stanford-cars": 0.7},
        {"sun397": 0.6, "stanford-cars": 0.65, "resisc45": 0.9},
    ]
    ta = [
        {"sun397": 0.85},
        {"sun397": 0.7, "stanford-cars": 0.75},
        {"sun397": 0.7, "stanford-cars": 0.6, "resisc45": 0.8},
    ]
    methods = {"opcm": {"options": {"alpha": 0.5}, "accuracy": opcm, "steps": [step] * 3}}
    if second_method:
        methods["task_arithmetic"] = {"options": {}, "accuracy": ta, "steps": [step] * 3}
    data = {
        "config": {
            "backbone": "mini",
            "preset": "mini-8",
            "order_seed": seed,
            "checkpoints": [{"source": t, "task": t} for t in TASKS],
        },
        "tasks": TASKS,
        "reference": {
            "pretrained": {"sun397": 0.5, "stanford-cars": 0.5, "resisc45": 0.9},
            "finetuned": {"sun397": 1.0, "stanford-cars": 0.9, "resisc45": 0.9},
        },
        "methods": methods,
    }
    if downloads:
        data["downloads"] = downloads
    return data


def test_the_compare_view_shows_every_matrix_their_difference_and_the_normalised_accuracy():
    data = RunResults.from_json(results_json())
    small = plots.compare_figure(data, "matrices")
    assert len(small.data) == 2  # one heatmap per method, on one shared colour scale
    assert {t.coloraxis for t in small.data} == {"coloraxis"}
    assert [a.text for a in small.layout.annotations] == ["opcm", "task_arithmetic"]
    assert list(small.data[1].z[0]) == pytest.approx([85.0, 70.0, 70.0])
    diff = plots.compare_figure(data, "difference", "opcm", "task_arithmetic")
    z = [list(r) for r in diff.data[0].z]
    assert z[0] == pytest.approx([5.0, 10.0, -10.0]) and z[1][0] is None and z[2][2] == pytest.approx(10.0)
    assert diff.data[0].zmin == -diff.data[0].zmax == pytest.approx(-10.0)
    assert plots.title_text(diff).startswith("opcm − task_arithmetic")
    normalised = plots.compare_figure(data, "normalised")
    # sun397: (0.6 − 0.5) / (1.0 − 0.5) = 20 % of the gap at the end; resisc45 has no gap: no value
    first = [list(r) for r in normalised.data[0].z]
    assert first[0] == pytest.approx([80.0, 60.0, 20.0]) and first[1][1:] == pytest.approx([50.0, 37.5])
    assert first[2] == [None, None, None]
    assert plots.compare_figure(RunResults.from_json({**results_json(), "methods": {}}), "matrices") is None


def test_the_compare_handler_follows_the_runs_methods_and_refuses_a_bad_view():
    handlers = app.LabHandlers(hosted=False)
    figure, a, b = handlers.compare(results_json(), "difference", "nope", None)
    assert (a["value"], b["value"]) == ("opcm", "task_arithmetic") and a["choices"] == ["opcm", "task_arithmetic"]
    assert plots.title_text(figure).startswith("opcm − task_arithmetic")
    figure, a, b = handlers.compare(results_json(), "difference", "task_arithmetic", "opcm")
    assert plots.title_text(figure).startswith("task_arithmetic − opcm")
    assert handlers.compare(None, "matrices", None, None)[0] is None
    with pytest.raises(gr.Error, match="compare view must be one of"):
        handlers.compare(results_json(), "../etc", None, None)


def test_the_history_keeps_every_run_of_a_session_up_to_a_bound_and_zips_them_in_its_folder(tmp_path):
    runs = history.record([], results_json(downloads="/w/run-1"))
    runs = history.record(runs, results_json(second_method=False, seed=42, downloads="/w/run-2"))
    runs = history.record(runs, results_json(second_method=False, seed=42, downloads="/w/run-2"))  # seen again
    runs = history.record(runs, {"methods": {}, "tasks": []})  # nothing completed: not kept
    assert [r["number"] for r in runs] == [1, 2] and "seed 42" in runs[1]["label"]
    frame = history.table(runs)
    assert frame["run"].tolist() == ["#1", "#1", "#2"] and frame["method"].tolist()[:2] == ["opcm", "task_arithmetic"]
    assert frame.loc[0, "options"] == "alpha=0.5" and frame.loc[1, "ACC (%)"] == pytest.approx(70.0)
    shown = history.styled_table(frame).to_html()
    assert ">70.0<" in shown and ">-15.0<" in shown  # one decimal, BWT signed
    overlay = history.overlay_figure(runs, [runs[1]["label"]])
    assert [t.name for t in overlay.data if t.showlegend is not False] == ["#2 opcm"]
    assert len(history.overlay_figure(runs, None).data) == 2 * 3  # all runs when none is chosen
    many = runs
    for n in range(3, 3 + history.MAX_RUNS + 3):
        many = history.record(many, results_json(downloads=f"/w/run-{n}"))
    assert len(many) == history.MAX_RUNS and many[-1]["number"] == 2 + history.MAX_RUNS + 3  # numbers never reused
    workspaces = Workspaces(tmp_path / "sessions")
    handlers = app.LabHandlers(hosted=True, workspaces=workspaces)
    path = Path(handlers.download_runs(None, runs))
    assert workspaces.owns(None, path) and not workspaces.owns("another", path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names == [
            "run-01/results.json",
            "run-01/config.json",
            "run-02/results.json",
            "run-02/config.json",
            "runs.csv",
        ]
        assert json.loads(archive.read("run-02/config.json"))["config"]["order_seed"] == 42
    with pytest.raises(gr.Error, match="no run to download yet"):
        handlers.download_runs(None, [])
    with pytest.raises(gr.Error, match="choose runs by their labels"):
        handlers.overlay(runs, "not a list")


def test_the_run_handler_chain_records_the_run_and_offers_the_table_and_overlay():
    handlers = app.LabHandlers(hosted=False)
    runs, shown, choice, figure = handlers.record_run(results_json(downloads="/w/run-9"), [])
    assert len(runs) == 1 and choice["value"] == [runs[0]["label"]]
    assert shown.data["method"].tolist() == ["opcm", "task_arithmetic"] and figure is not None
    assert handlers.record_run({"not": "results"}, runs)[0] == runs  # anything else changes nothing
