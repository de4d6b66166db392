"""``--tracker tensorboard|mlflow`` on ``run`` and ``sweep``, read back offline with each tracker's own reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from merging.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = "16"
TASKS = ("digits", "colors", "shapes")  # three mini tasks: three quick steps per run
THREE = tuple(arg for t in TASKS for arg in ("--checkpoint", str(ROOT / "assets/mini/checkpoints" / f"mini-{t}")))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``directory``, through TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_run_logs_steps_tasks_and_diagnostics_to_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "r.json"
    code, stdout, stderr = cli(
        capsys,
        *("run", *THREE, "--method", "opcm", "--order-seed", "42", "--samples", SAMPLES),
        *("--out", str(out), "--tracker", "tensorboard"),
    )
    assert code == 0, stderr
    assert f"logged to tensorboard in {tmp_path / 'r.tensorboard'}" in stdout
    results = json.loads(out.read_text())
    opcm = results["methods"]["opcm"]
    logged = scalars(tmp_path / "r.tensorboard")
    assert [s for s, _ in logged["opcm/acc"]] == [1, 2, 3]
    assert [v for _, v in logged["opcm/acc"]] == pytest.approx(opcm["acc_per_step"], abs=1e-6)  # float32 events
    assert [v for _, v in logged["opcm/bwt"]] == pytest.approx(opcm["bwt_per_step"][1:], abs=1e-6)
    first = results["tasks"][0]
    assert [v for _, v in logged[f"opcm/accuracy/{first}"]] == pytest.approx([a[first] for a in opcm["accuracy"]])
    assert [v for _, v in logged["opcm/diagnostics/lambda"]] == pytest.approx(
        [s["diagnostics"]["lambda"] for s in opcm["steps"]]
    )
    assert json.loads((tmp_path / "r.tensorboard" / "r.json").read_text()) == results  # results.json attached


def test_without_the_flag_nothing_is_logged(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, _ = cli(capsys, "run", *THREE, "--method", "weight_average", "--samples", SAMPLES, "--out", str(out))
    assert code == 0 and "logged" not in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.weight_average.csv"]


def test_a_sweep_gives_each_trial_a_tensorboard_directory_under_its_own(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "sweep"
    code, _, stderr = cli(
        capsys,
        *("sweep", *THREE, "--grid", "task_arithmetic.scaling=0.3,0.5", "--order-seeds", "42,43"),
        *("--samples", SAMPLES, "--out", str(out), "--tracker", "tensorboard"),
    )
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    for name, folder in (
        ("task_arithmetic[scaling=0.3]", "task_arithmetic-scaling=0.3"),
        ("task_arithmetic[scaling=0.5]", "task_arithmetic-scaling=0.5"),
    ):
        for run in summary["methods"][name]["runs"]:
            directory = out / "tensorboard" / folder / f"seed-{run['order_seed']}"
            acc = scalars(directory)["task_arithmetic/acc"]
            assert acc[-1] == (3, pytest.approx(run["acc"], abs=1e-6))
            assert (directory / f"seed-{run['order_seed']}.json").is_file()


def test_a_sweep_in_mlflow_is_one_parent_run_with_a_child_per_trial(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep-test")
    out = tmp_path / "sweep"
    code, stdout, stderr = cli(
        capsys,
        *("sweep", *THREE, "--method", "weight_average", "--grid", "opcm.alpha=0.3"),
        *("--order-seeds", "42,43", "--samples", SAMPLES, "--out", str(out), "--tracker", "mlflow"),
    )
    assert code == 0, stderr
    assert "logged 4 trials to mlflow" in stdout
    summary = json.loads((out / "summary.json").read_text())

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("sweep-test").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.mlflow.runName = 'sweep sweep'")
    assert parent.data.params["order_seeds"] == "[42, 43]"
    assert parent.data.metrics["opcm_alpha_0.3_/acc_mean"] == pytest.approx(
        summary["methods"]["opcm[alpha=0.3]"]["acc_mean"]
    )
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.json", "table.md"}
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(
        f"{row} seed {s}" for row in ("weight_average", "opcm[alpha=0.3]") for s in (42, 43)
    )
    child = by_name["opcm[alpha=0.3] seed 43"]
    assert child.data.params["opcm.alpha"] == "0.3" and child.data.params["order_seed"] == "43"
    recorded = json.loads((out / "trials" / "opcm-alpha=0.3" / "seed-43.json").read_text())["methods"]["opcm"]
    history = client.get_metric_history(child.info.run_id, "opcm/acc")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(
        zip(range(1, 4), recorded["acc_per_step"], strict=True)
    )
    assert "seed-43.json" in {a.path for a in client.list_artifacts(child.info.run_id)}


@pytest.mark.parametrize(
    ("kind", "install"), [("tensorboard", "pip install tensorboard"), ("mlflow", "pip install mlflow")]
)
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, kind, install, command):
    monkeypatch.setitem(sys.modules, kind, None)  # import raises ImportError
    out = tmp_path / ("r.json" if command == "run" else "sweep")
    code, stdout, stderr = cli(
        capsys, command, "--preset", "mini-8", "--method", "opcm", "--out", str(out), "--tracker", kind
    )
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert f"--tracker {kind} needs the {kind} package" in stderr and install in stderr
    assert not out.exists() or not any(out.iterdir())
