"""``python -m merging sweep``: trials equal single runs, the summary's schema, resuming, failures, Ctrl-C.

Every sweep here runs the mini benchmark with a handful of test images per task, so a trial
takes about a second.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from merging.cli.main import main
from merging.experiment import sweep_runner
from merging.experiment.sweep import parse_order_seeds, points

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = "16"
# Three mini tasks: each trial merges and evaluates 3 steps instead of mini-8's 8
THREE = tuple(
    arg
    for task in ("digits", "colors", "shapes")
    for arg in ("--checkpoint", str(ROOT / "assets/mini/checkpoints" / f"mini-{task}"))
)
TIMINGS = ("merge_seconds", "eval_seconds", "peak_memory_bytes", "memory_increase_bytes")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def without_timings(results: dict) -> dict:
    """results.json minus what depends on the machine's speed (times and memory)."""
    for method in results["methods"].values():
        for step in method["steps"]:
            for key in TIMINGS:
                step.pop(key)
    return results


def test_parsing_order_seeds_and_naming_grid_points():
    assert parse_order_seeds("42-51") == list(range(42, 52))
    assert parse_order_seeds("42, 45,50-51") == [42, 45, 50, 51]
    rows = points({"opcm": {"alpha": 0.5}}, {"opcm": {"alpha": [0.3, 0.7], "zero_diagonal": [True, False]}})
    assert [r.name for r in rows] == [
        "opcm[alpha=0.3,zero_diagonal=true]",
        "opcm[alpha=0.3,zero_diagonal=false]",
        "opcm[alpha=0.7,zero_diagonal=true]",
        "opcm[alpha=0.7,zero_diagonal=false]",
    ]
    assert rows[1].options == {"alpha": 0.3, "zero_diagonal": False}
    assert points({"weight_average": {}}, {"ties": {"top_k": [10]}})[1].name == "ties[top_k=10]"


def test_each_trial_is_the_single_run_and_the_summary_has_the_issues_schema(tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, stderr = cli(
        capsys,
        *("sweep", "--preset", "mini-8", "--method", "opcm", "--grid", "task_arithmetic.scaling=0.3,0.5"),
        *("--order-seeds", "42,43", "--samples", SAMPLES, "--workers", "2", "--out", str(out)),
    )
    assert code == 0, stderr
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 6 and progress[-1].startswith("[6/6]") and "over 2 orders: ACC" in "".join(progress)

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"config", "methods"}
    assert list(summary["methods"]) == ["opcm", "task_arithmetic[scaling=0.3]", "task_arithmetic[scaling=0.5]"]
    assert summary["config"]["order_seeds"] == [42, 43] and summary["config"]["samples"] == int(SAMPLES)
    for name, row in summary["methods"].items():
        assert {"acc_mean", "acc_std", "bwt_mean", "bwt_std", "runs"} <= set(row)
        assert [r["order_seed"] for r in row["runs"]] == [42, 43]
        accs = [r["acc"] for r in row["runs"]]
        assert all(0 <= a <= 1 for a in accs) and row["acc_mean"] == pytest.approx(sum(accs) / 2)
        assert row["acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
        for run in row["runs"]:
            assert set(run) == {"order_seed", "options", "acc", "bwt", "results"}
            recorded = json.loads((out / run["results"]).read_text())
            method = recorded["methods"][name.split("[")[0]]
            assert (method["acc"], method["bwt"], method["options"]) == (run["acc"], run["bwt"], run["options"])
    assert summary["methods"]["task_arithmetic[scaling=0.5]"]["runs"][0]["options"] == {"scaling": 0.5}
    assert summary["methods"]["opcm"]["runs"][0]["options"]["alpha"] == 0.5  # every option, as results.json has

    # the trial (opcm, seed 43) against `run` with the same seed, options and samples
    single = tmp_path / "single.json"
    code, _, stderr = cli(
        capsys,
        *("run", "--preset", "mini-8", "--method", "opcm", "--order-seed", "43", "--samples", SAMPLES),
        *("--out", str(single)),
    )
    assert code == 0, stderr
    trial = out / summary["methods"]["opcm"]["runs"][1]["results"]
    assert without_timings(json.loads(trial.read_text())) == without_timings(json.loads(single.read_text()))
    assert trial.with_name("seed-43.opcm.csv").read_text() == single.with_name("single.opcm.csv").read_text()

    # the papers' table, beside real ViT-B/32 (which mini-8 mirrors) for the rows at default options
    markdown = (out / "table.md").read_text().splitlines()
    assert "published ACC (real CLIP ViT-B/32, 8 tasks)" in markdown[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in markdown[2:]}
    assert rows["opcm"][0] == "2" and " ± " in rows["opcm"][1] and rows["opcm"][3] == "75.5"
    assert rows["task_arithmetic[scaling=0.3]"][3] == "67.5" and rows["task_arithmetic[scaling=0.5]"][3] == ""
    assert {"pretrained", "finetuned"} <= set(rows)
    table = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert float(table["opcm"]["acc_mean_pct"]) == pytest.approx(100 * summary["methods"]["opcm"]["acc_mean"])


def test_shared_inputs_are_computed_once_for_all_trials(tmp_path, capsys, monkeypatch):
    """Images are decoded and the reference rows measured before the trials, never by a trial."""
    from merging.evaluation.datasets import ImageCache
    from merging.experiment.runner import ContinualRun

    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "cache"))  # nothing cached yet
    counts = {"decoded": 0, "references": 0}
    decode, references = ImageCache._decode, ContinualRun._load_or_compute_references

    def counting_decode(self, *args, **kwargs):
        counts["decoded"] += 1
        return decode(self, *args, **kwargs)

    def counting_references(self):
        counts["references"] += 1
        return references(self)

    monkeypatch.setattr(ImageCache, "_decode", counting_decode)
    monkeypatch.setattr(ContinualRun, "_load_or_compute_references", counting_references)
    code, _, stderr = cli(
        capsys,
        *("sweep", *THREE, "--method", "weight_average", "--method", "task_arithmetic"),
        *("--order-seeds", "42-44", "--samples", SAMPLES, "--workers", "2", "--out", str(tmp_path / "s")),
    )
    assert code == 0, stderr
    assert counts == {"decoded": 3, "references": 1}  # 3 test sets and one measurement, for 6 trials


def test_a_failed_trial_is_recorded_the_sweep_goes_on_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    args = ("sweep", *THREE, "--method", "weight_average", "--order-seeds", "42-44")
    args += ("--samples", SAMPLES, "--workers", "1", "--out", str(out))
    real = sweep_runner.run_trial
    ran = []

    def failing_on_43(trial, *rest, **kwargs):
        ran.append(trial.order_seed)
        if trial.order_seed == 43:
            raise RuntimeError("checkpoint went missing\nsecond line")
        return real(trial, *rest, **kwargs)

    monkeypatch.setattr(sweep_runner, "run_trial", failing_on_43)
    code, stdout, stderr = cli(capsys, *args)
    assert code == 1 and "1 of 3 trials failed" in stderr
    assert "[2/3] weight_average seed 43 failed: RuntimeError: checkpoint went missing second line" in stdout
    runs = json.loads((out / "summary.json").read_text())["methods"]["weight_average"]["runs"]
    assert [r["order_seed"] for r in runs] == [42, 43, 44]
    assert runs[1]["acc"] is None and runs[1]["error"] == "RuntimeError: checkpoint went missing second line"
    first = (out / runs[0]["results"]).stat().st_mtime_ns

    ran.clear()
    monkeypatch.setattr(
        sweep_runner, "run_trial", lambda trial, *rest, **kw: ran.append(trial.order_seed) or real(trial, *rest, **kw)
    )
    code, stdout, stderr = cli(capsys, *args)
    assert code == 0, stderr
    assert ran == [43] and "2 finished trials found" in stdout  # only the failed trial runs again
    assert (out / runs[0]["results"]).stat().st_mtime_ns == first
    runs = json.loads((out / "summary.json").read_text())["methods"]["weight_average"]["runs"]
    assert all(r["acc"] is not None and "error" not in r for r in runs)


def test_a_resumed_folder_from_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    base = ("sweep", *THREE, "--method", "weight_average", "--order-seeds", "42", "--out", str(out))
    assert cli(capsys, *base, "--samples", SAMPLES)[0] == 0
    code, _, stderr = cli(capsys, *base, "--samples", "8")
    assert code == 2 and "holds weight_average seed 42 run with another configuration" in stderr


def test_ctrl_c_keeps_the_finished_trials(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "merging", "sweep", *THREE, "--method", "opcm"]
    command += ["--order-seeds", "42-51", "--samples", SAMPLES, "--workers", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        # a suite started in the background (``cmd &``) inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the sweep the default disposition, as a terminal does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in process.stdout:
            if line.startswith("[1/10]"):
                process.send_signal(signal.SIGINT)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 2, stderr
    assert "interrupted; the" in stderr and "finished trials of 10 are kept" in stderr
    runs = json.loads((out / "summary.json").read_text())["methods"]["opcm"]["runs"]
    assert 1 <= len(runs) < 10 and all((out / r["results"]).is_file() for r in runs)


@pytest.mark.parametrize(
    ("flags", "culprit"),
    [
        (("--grid", "opcm.alpha="), "grid 'opcm.alpha=': give one or more values"),
        (("--grid", "opcm.alpha=0.1,,0.3"), "grid 'opcm.alpha=0.1,,0.3': give one or more values"),
        (("--grid", "opcm.nope=1"), "unknown option 'nope' for opcm"),
        (("--grid", "opcm.alpha=2"), "grid 'opcm.alpha=2'"),
        (("--grid", "alpha=0.3"), "grid 'alpha=0.3' is not METHOD.KEY=V1,V2"),
        (("--grid", "nosuch.alpha=1"), "unknown method 'nosuch'"),
        (("--grid", "opcm.alpha=0.3,0.3"), "value 0.3 is listed twice"),
        (("--order-seeds", "51-42"), "the range 51-42 is empty"),
        (("--order-seeds", ""), "'' is not a seed or a range"),
        (("--order-seeds", "42,x"), "'x' is not a seed or a range"),
        (("--method", "nosuch"), "unknown method 'nosuch'"),
        (("--ray-address", "auto"), "--ray-address needs --backend ray"),
        (("--workers", "0"), "--workers"),
    ],
)
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, capsys, flags, culprit):
    code, stdout, stderr = cli(
        capsys, "sweep", "--preset", "mini-8", "--method", "opcm", "--out", str(tmp_path / "s"), *flags
    )
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and culprit in stderr
    assert not (tmp_path / "s" / "summary.json").exists()


def test_the_ray_backend_gives_the_local_backends_numbers(tmp_path, capsys):
    """Trials as tasks of a local Ray instance (2 CPUs), shared inputs in its object store."""
    pytest.importorskip("ray")
    args = ("sweep", *THREE, "--method", "weight_average", "--grid", "ties.top_k=10")
    args += ("--order-seeds", "42,43", "--samples", SAMPLES, "--workers", "2")
    code, _, stderr = cli(capsys, *args, "--out", str(tmp_path / "local"))
    assert code == 0, stderr
    code, stdout, stderr = cli(capsys, *args, "--out", str(tmp_path / "ray"), "--backend", "ray")
    assert code == 0, stderr
    assert stdout.count("] weight_average seed") == 2 and stdout.count("] ties[top_k=10] seed") == 2
    local = json.loads((tmp_path / "local" / "summary.json").read_text())
    remote = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert remote["methods"] == local["methods"]
    for row in local["methods"].values():
        for run in row["runs"]:
            ours, theirs = (json.loads((tmp_path / side / run["results"]).read_text()) for side in ("local", "ray"))
            assert without_timings(theirs) == without_timings(ours)


def test_without_ray_the_ray_backend_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, stderr = cli(
        capsys, "sweep", "--preset", "mini-8", "--method", "opcm", "--backend", "ray", "--out", str(tmp_path)
    )
    assert code == 2 and stderr.count("\n") == 1 and "pip install 'ray>=" in stderr
    assert not (tmp_path / "summary.json").exists()


def test_a_stop_event_ends_the_local_pool_keeping_what_finished():
    """What an app's Stop button does through the library: no trial starts after it, finished ones stay."""
    import threading

    from merging.experiment.runner import RunConfig, parse_checkpoint
    from merging.experiment.sweep import Point, plan

    checkpoints = [parse_checkpoint(THREE[i]) for i in range(1, len(THREE), 2)]
    template = RunConfig(backbone="mini", checkpoints=checkpoints, samples=int(SAMPLES))
    trials = plan(template, checkpoints, [Point("weight_average", "weight_average", {})], [42, 43, 44, 45])
    shared = sweep_runner.prepare_shared(trials)
    stop, finished = threading.Event(), []

    def on_done(outcome):
        finished.append(outcome)
        stop.set()

    sweep_runner.run_local(trials, shared, 1, on_done, "cpu", stop=stop)
    assert [o.trial.order_seed for o in finished] == [42] and finished[0].results is not None
