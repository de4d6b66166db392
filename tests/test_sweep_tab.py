"""The app's Sweep tab at function level: its endpoint's checks, a real sweep streamed into the session's
folder, Stop keeping finished trials, and the figures drawn from a summary.json.

The sweeps here run three mini-8 checkpoints with 16 test images per task and fast methods
(weight averaging, task arithmetic), so a trial takes well under a second.
"""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import gradio as gr
import pytest

import app
from merging.experiment import sweep_runner
from merging.ui import lab, sweep_page, sweep_plots, sweep_tab
from merging.ui.hosting import SourcePolicy, Workspaces

THREE = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:3])


def inputs(**changes):
    """The /sweep endpoint's inputs as a script sends them, with ``changes`` applied."""
    values = {
        "backbone": "mini",
        "preset": "mini-8",
        "checkpoints": THREE,
        "methods": ["weight_average"],
        "grid": "task_arithmetic.scaling=0.3,0.5",
        "order_seeds": "42,43",
        "samples": 16,
        "eval_mode": "seen",
        "device": "cpu",
        "backend": "local",
    }
    values.update(changes)
    return list(values.values())


def handlers(tmp_path: Path, hosted: bool = False) -> sweep_page.SweepHandlers:
    return sweep_page.SweepHandlers(Workspaces(tmp_path / "sessions"), hosted)


def sweep_folders(tabs: sweep_page.SweepHandlers) -> list[Path]:
    return sorted(tabs.workspaces.root.glob("*/sweep-*"))


@pytest.mark.parametrize(
    ("hosted", "changes", "culprit"),
    [
        (False, {"grid": "alpha=0.3"}, "grid 'alpha=0.3' is not METHOD.KEY=V1,V2"),
        (False, {"grid": "opcm.nope=1"}, "unknown option 'nope' for opcm"),
        (False, {"grid": "opcm.alpha=2"}, "grid 'opcm.alpha=2': opcm option alpha=2 is out of range"),
        (False, {"grid": "nosuch.alpha=1"}, "unknown method 'nosuch'"),
        (False, {"methods": ["weight_average", "nosuch"]}, "unknown method 'nosuch'"),
        (False, {"methods": [], "grid": ""}, "choose at least one method, or give a grid"),
        (False, {"order_seeds": "51-42"}, "the range 51-42 is empty"),
        (False, {"order_seeds": "42,x"}, "'x' is not a seed or a range"),
        (False, {"order_seeds": "1-100000000000"}, "1-100000000000 is above the largest seed"),
        (False, {"order_seeds": "0-999999"}, "at most 100 orders per sweep"),
        (False, {"order_seeds": ""}, "give order seeds"),
        # counted before the product is built: 30^3 rows would take a while to make
        (
            False,
            {
                "grid": "\n".join(
                    f"dop.{k}={','.join(f'0.{v:02d}' for v in range(1, 31))}" for k in ("alpha", "ema_beta")
                )
                + "\ndop.steps="
                + ",".join(str(v) for v in range(1, 31))
            },
            "this sweep has 54002 trials",
        ),
        (True, {"grid": "opcm.alpha=0.1,0.2,0.3,0.4,0.5,0.6,0.7", "order_seeds": "42-51"}, "has 80 trials"),
        (True, {"samples": 5}, "test images per task must be between 16 and 2000"),
        (True, {"backend": "ray"}, "the ray backend is off on a hosted lab"),
        (True, {"checkpoints": "/etc/hostname=mini-digits"}, "server paths cannot be read"),
        (False, {"device": "tpu"}, "device must be one of"),
        (False, {"samples": 1.5}, "test images per task must be a whole number"),
        (False, {"methods": "opcm"}, "methods must be a list"),
    ],
)
def test_bad_input_is_one_error_naming_the_culprit_and_nothing_runs(tmp_path, hosted, changes, culprit):
    tabs = handlers(tmp_path, hosted)
    updates = []
    with pytest.raises(gr.Error) as error:
        for update in tabs.run(None, *inputs(**changes)):
            updates.append(update)
    assert culprit in error.value.message and "\n" not in error.value.message
    assert error.value.title == "Error" and not error.value.print_exception
    assert len(updates) == 1 and updates[0][0] == f"**Error:** {error.value.message}"
    assert sweep_folders(tabs) == [] and tabs.active == {}


def test_the_ray_backend_is_offered_only_where_ray_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_tab, "ray_available", lambda: False)
    tabs = handlers(tmp_path)
    assert tabs.backends() == ["local"]
    with pytest.raises(gr.Error, match=r"pip install 'ray>="):
        list(tabs.run(None, *inputs(backend="ray")))
    monkeypatch.setattr(sweep_tab, "ray_available", lambda: True)
    assert tabs.backends() == ["local", "ray"] and handlers(tmp_path, hosted=True).backends() == ["local"]


def test_every_ablation_is_a_grid_the_library_plans(tmp_path):
    tabs = handlers(tmp_path)
    sizes = {}
    for study in sweep_tab.ABLATIONS:
        methods, grid, about = tabs.ablation(study.key)
        assert methods == [] and study.title in about
        request = sweep_tab.request_from_values(
            "mini", "mini-8", THREE, methods, grid, "42-51", 16, "seen", "cpu", "local", False
        )
        sizes[study.key] = [row.name for row in sweep_tab.plan_sweep(request, SourcePolicy(), False).rows]
    assert len(sizes["opcm-alpha"]) == 10 and sizes["opcm-alpha"][0] == "opcm[alpha=0.1]"
    assert sizes["opcm-alpha"][-1] == "opcm[alpha=1]"
    assert len(sizes["opcm-projection"]) == 4 and len(sizes["otmf-alpha"]) == 5
    assert sizes["otmf-masks"] == ["otmf[masks=on]", "otmf[masks=off]"]
    assert sizes["otmf-heads"] == ["otmf[head_tuning=on]", "otmf[head_tuning=off]"]
    with pytest.raises(gr.Error, match="unknown ablation 'nope'"):
        tabs.ablation("nope")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A real sweep through the tab's endpoint: weight averaging and task arithmetic at two scalings, 2 orders."""
    tabs = handlers(tmp_path_factory.mktemp("sweep-tab"))
    updates = list(tabs.run(None, *inputs()))
    return tabs, updates


def test_a_sweep_streams_each_trial_and_leaves_its_downloads_in_the_session_folder(finished_sweep):
    tabs, updates = finished_sweep
    statuses = [u[0] for u in updates]
    assert "3 rows × 2 orders = 6 trials" in statuses[0]
    assert [f"**{n} of 6 trials**" in s for n, s in enumerate(statuses[1:-1], 1)] == [True] * 6
    assert statuses[-1].startswith("**Done:** 6 trials")
    log = updates[-1][1].splitlines()
    assert sum(line.startswith("[") for line in log) == 6 and any("[6/6]" in line for line in log)

    files = [Path(f) for f in updates[-1][5]]
    assert [f.name for f in files] == ["summary.json", "table.md", "table.csv", "sweep.zip"]
    assert all(tabs.workspaces.owns(None, f) and f.parent == files[0].parent for f in files)
    assert files[0].parent.name.startswith("sweep-") and tabs.active == {}
    summary = json.loads(files[0].read_text())
    assert list(summary["methods"]) == [
        "weight_average",
        "task_arithmetic[scaling=0.3]",
        "task_arithmetic[scaling=0.5]",
    ]
    assert summary["config"]["order_seeds"] == [42, 43] and summary["config"]["samples"] == 16
    with zipfile.ZipFile(files[3]) as archive:
        names = set(archive.namelist())
        assert {"summary.json", "table.md", "table.csv"} <= names
        for row in summary["methods"].values():
            for run in row["runs"]:
                assert run["acc"] is not None and run["results"] in names
                assert json.loads(archive.read(run["results"]))["methods"][row["method"]]["acc"] == run["acc"]

    table = updates[-1][4]
    assert list(table["method"]) == ["pretrained", "finetuned", *summary["methods"]]
    assert "published ACC (real CLIP ViT-B/32, 8 tasks)" in table.columns
    row = summary["methods"]["weight_average"]
    shown = table.set_index("method").loc["weight_average", "ACC (%)"]
    assert shown == f"{100 * row['acc_mean']:.1f} ± {100 * row['acc_std']:.1f}"


def test_stop_keeps_the_finished_trials(tmp_path, monkeypatch):
    """Stop after the first trial: the trial in flight ends at its next step, none starts, the first stays."""
    tabs = handlers(tmp_path)
    gate = threading.Event()
    real = sweep_runner.run_trial

    def held_after_the_first(trial, *rest, **kwargs):
        if trial.order_seed != 42:  # in flight when Stop comes: waits for it, then runs until its first step
            gate.wait(60)
        return real(trial, *rest, **kwargs)

    monkeypatch.setattr(sweep_runner, "run_trial", held_after_the_first)
    monkeypatch.setattr(sweep_tab, "pool_workers", lambda device, pending: 2)
    stream = tabs.run(None, *inputs(grid="", order_seeds="42-45"))
    updates = [next(stream)]
    second = tabs.run(None, *inputs())  # one sweep per session at a time
    assert "a sweep is already running in this session" in next(second)[0]
    with pytest.raises(gr.Error, match="a sweep is already running in this session"):
        next(second)
    updates.append(next(stream))
    assert "**1 of 4 trials**" in updates[-1][0]
    assert tabs.stop(None).startswith("Stopping")
    gate.set()
    updates += list(stream)
    assert updates[-1][0].startswith("**Stopped**") and "the 1 finished trials of 4 are kept" in updates[-1][0]
    files = {Path(f).name: Path(f) for f in updates[-1][5]}
    runs = json.loads(files["summary.json"].read_text())["methods"]["weight_average"]["runs"]
    assert [(r["order_seed"], r["acc"] is not None) for r in runs] == [(42, True)]
    with zipfile.ZipFile(files["sweep.zip"]) as archive:
        trials = [n for n in archive.namelist() if n.startswith("trials/") and n.endswith(".json")]
    assert trials == ["trials/weight_average/seed-42.json"]
    assert tabs.active == {} and tabs.stop(None) == "No sweep is running in this session."


def test_the_figures_build_from_a_summary_json(finished_sweep, tmp_path):
    _, updates = finished_sweep
    path = Path(updates[-1][5][0])
    summary = json.loads(path.read_text())
    boxes = sweep_plots.box_figure(summary)
    by_row = {(trace.y[0], trace.xaxis): trace for trace in boxes.data}
    assert len(boxes.data) == 6  # ACC and BWT for each of the three rows
    for name, row in summary["methods"].items():
        assert list(by_row[(name, "x")].x) == pytest.approx([100 * r["acc"] for r in row["runs"]])
        assert list(by_row[(name, "x2")].x) == pytest.approx([100 * r["bwt"] for r in row["runs"]])
        assert list(by_row[(name, "x")].customdata) == [42, 43]

    curves = sweep_plots.sensitivity_figure(summary)
    acc, bwt = curves.data
    rows = [summary["methods"][f"task_arithmetic[scaling={s}]"] for s in ("0.3", "0.5")]
    assert list(acc.x) == [0.3, 0.5] and list(acc.y) == pytest.approx([100 * r["acc_mean"] for r in rows])
    assert list(acc.error_y.array) == pytest.approx([100 * r["acc_std"] for r in rows])
    assert list(bwt.y) == pytest.approx([100 * r["bwt_mean"] for r in rows])
    assert curves.layout.xaxis.title.text == "scaling"

    # a choice (OTMF's masks) on a categorical axis; a second grid option draws a line per value
    categorical = json.loads(json.dumps(summary))
    categorical["config"]["grid"] = {"task_arithmetic": {"masks": ["on", "off"], "scaling": ["0.3", "0.5"]}}
    for row, (mask, scaling) in zip(
        categorical["methods"].values(), [(None, None), ("on", 0.3), ("off", 0.3)], strict=True
    ):
        for run in row["runs"]:
            run["options"] = {"masks": mask, "scaling": scaling} if mask else run["options"]
    lines = sweep_plots.sensitivity_figure(categorical)
    assert len(lines.data) == 2 and list(lines.data[0].x) == ["on", "off"]
    assert lines.layout.xaxis.type == "category" and lines.data[0].name == "task_arithmetic (scaling=0.3)"

    without_grid = {**summary, "config": {**summary["config"], "grid": {}}}
    assert sweep_plots.sensitivity_figure(without_grid) is None
    nothing_yet = {**summary, "methods": {n: {**r, "runs": []} for n, r in summary["methods"].items()}}
    assert sweep_plots.box_figure(nothing_yet) is None


def test_the_page_has_the_sweep_tab_and_its_endpoints():
    demo = app.build_app()
    endpoints = demo.get_api_info()["named_endpoints"]
    assert {"/sweep", "/sweep_stop"} <= set(endpoints)
    names = [p["parameter_name"] for p in endpoints["/sweep"]["parameters"]]
    assert names == [
        "backbone",
        "preset",
        "checkpoints",
        "methods",
        "grid",
        "order_seeds",
        "samples",
        "eval_mode",
        "device",
        "backend",
    ]
    tabs = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs[-1] == "Sweep"


def test_a_script_runs_a_sweep_through_the_served_page(served_app):
    """/sweep over HTTP: the same checks, the streamed trials, the downloads (fetched by the client)."""
    from gradio_client import Client

    client = Client(served_app, verbose=False)
    job = client.submit(*inputs(grid="", order_seeds="42,43"), api_name="/sweep")
    final = job.result()
    statuses = [output[0] for output in job.outputs()]
    assert "**1 of 2 trials**" in "".join(statuses) and final[0].startswith("**Done:** 2 trials")
    files = {Path(f).name: Path(f) for f in final[5]}
    assert set(files) == {"summary.json", "table.md", "table.csv", "sweep.zip"}
    runs = json.loads(files["summary.json"].read_text())["methods"]["weight_average"]["runs"]
    assert [r["order_seed"] for r in runs] == [42, 43] and all(r["acc"] is not None for r in runs)
    assert client.predict(api_name="/sweep_stop") == "No sweep is running in this session."
    with pytest.raises(Exception, match="unknown option 'nope' for opcm"):
        client.predict(*inputs(grid="opcm.nope=1"), api_name="/sweep")


def test_the_pool_is_sized_by_the_cores_on_the_cpu_and_left_to_the_gpu_budget_on_cuda(monkeypatch):
    """On CUDA the tab passes no worker count, so the backends pack as many trials as fit in the budget."""
    import torch

    from merging.compute import devices

    assert sweep_tab.pool_workers("cpu", 1) == 1  # never more workers than trials
    assert 1 <= sweep_tab.pool_workers("cpu", 50) <= 50
    monkeypatch.setattr(devices, "resolve_device", lambda device: torch.device("cuda"))
    assert sweep_tab.pool_workers("cuda", 50) is None
