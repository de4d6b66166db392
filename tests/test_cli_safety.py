"""The command line refuses bad input before any work, never loses results, and warns about bad labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import merging.cli.run
from merging.cli.main import main
from merging.evaluation.tasks import ASSETS
from merging.experiment.runner import ContinualRun

MINI = ASSETS / "mini" / "checkpoints"
DIGITS, LETTERS, TEXTURES = (str(MINI / t) for t in ("mini-digits", "mini-letters", "mini-textures"))
PROJECT = ASSETS.parent


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_work(monkeypatch):
    """Any attempt to start a run fails the test: refusals must come before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(merging.cli.run, "ContinualRun", refuse)


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    return err


def test_every_flag_is_checked_before_any_work(tmp_path, capsys, no_work):
    run = ["run", "--method", "opcm"]
    cases = {
        "--samples: invalid whole number >= 0 value: '-5'": [*run, "--preset", "mini-8", "--samples", "-5"],
        "--order-seed: invalid integer value: 'x'": [*run, "--preset", "mini-8", "--order-seed", "x"],
        "--out /proc/nope/r.json": [*run, "--preset", "mini-8", "--out", "/proc/nope/r.json"],
        "inside the project's assets/": [*run, "--preset", "mini-8", "--out", f"{DIGITS}/r.json"],
        "unknown task 'mini-nosuch'; registered tasks: ": [*run, "--checkpoint", f"{DIGITS}=mini-nosuch"],
        "not a path or a Hub id: 'hello world ???'": [*run, "--checkpoint", "hello world ???"],
        f"checkpoint {DIGITS} is listed twice (positions 1 and 2)": [
            *run,
            "--checkpoint",
            DIGITS,
            "--checkpoint",
            DIGITS + "/",
        ],
        "opcm option alpha=2 is out of range": [*run, "--preset", "mini-8", "--opt", "opcm.alpha=2"],
        "unknown preset 'nope'": [*run, "--preset", "nope"],
    }
    for expected, argv in cases.items():
        assert expected in one_line_error(capsys, argv), expected
    config = tmp_path / "r.json"
    config.write_text(json.dumps({"config": {"checkpoints": [{"source": DIGITS, "task": "mini-digits"}]}}))
    for flags in (["--preset", "mini-12"], ["--samples", "16"], ["--method", "ties"], ["--order-seed", "3"]):
        message = one_line_error(capsys, ["run", "--config", str(config), *flags])
        assert f"{flags[0]} cannot be combined with --config" in message
    assert "would write into the input" in one_line_error(
        capsys, ["run", "--config", str(config), "--out", str(config)]
    )
    assert main(["run", "--help"]) == 0 and "--allow-duplicates" in capsys.readouterr().out


def test_merge_accepts_method_options_as_run_does_and_checks_its_output(tmp_path, capsys):
    base = str(ASSETS / "mini" / "base")
    common = ["merge", "--method", "opcm", "--pretrained", base, "--checkpoint", LETTERS]
    assert main([*common, "--out", str(tmp_path / "m.safetensors"), "--opt", "opcm.alpha=0.4"]) == 0
    assert "opcm option alpha=7" in one_line_error(capsys, [*common, "--out", str(tmp_path / "x"), "--opt", "alpha=7"])
    assert "method ties is not among" in one_line_error(
        capsys, [*common, "--out", str(tmp_path / "x"), "--opt", "ties.top_k=3"]
    )
    assert "cannot write --out /sys/x.safetensors" in one_line_error(capsys, [*common, "--out", "/sys/x.safetensors"])
    before = (MINI / "mini-digits" / "model.safetensors").read_bytes()
    assert "inside the project's assets/" in one_line_error(capsys, [*common, "--out", DIGITS])
    assert (MINI / "mini-digits" / "model.safetensors").read_bytes() == before  # the benchmark is untouched
    own = tmp_path / "own"
    main(["merge", "--method", "magmax", "--pretrained", base, "--checkpoint", LETTERS, "--out", str(own)])
    capsys.readouterr()
    assert "would write into the input checkpoint" in one_line_error(
        capsys, ["merge", "--method", "opcm", "--pretrained", base, "--checkpoint", str(own), "--out", str(own)]
    )
    twice = ["merge", "--method", "opcm", "--pretrained", base, "--checkpoint", LETTERS, "--checkpoint", LETTERS]
    assert "listed twice" in one_line_error(capsys, [*twice, "--out", str(tmp_path / "t.safetensors")])
    assert main([*twice, "--out", str(tmp_path / "t.safetensors"), "--allow-duplicates"]) == 0


def test_results_that_cannot_be_written_at_the_end_are_rescued(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    original = ContinualRun.save

    def failing(self, path):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        return original(self, path)

    monkeypatch.setattr(ContinualRun, "save", failing)
    argv = ["run", "--checkpoint", DIGITS, "--checkpoint", LETTERS, "--method", "task_arithmetic"]
    message = one_line_error(capsys, [*argv, "--samples", "16", "--device", "cpu", "--out", str(out)])
    assert f"cannot write {out} (No space left on device); the results are in " in message
    rescued = Path(message.rstrip().rsplit(" ", 1)[-1])
    assert rescued.name == "r.json" and json.loads(rescued.read_text())["completed_steps"] == 2


def test_swapped_task_labels_get_a_warning_in_the_output_and_the_results(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["run", "--checkpoint", f"{DIGITS}=mini-textures", "--checkpoint", f"{TEXTURES}=mini-digits"]
    assert main([*argv, "--method", "task_arithmetic", "--samples", "48", "--device", "cpu", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = json.loads(out.read_text())["warnings"]
    assert len(warnings) == 2 and err.count("warning: ") == 2
    assert f"checkpoint {DIGITS} scores" in warnings[0] and "its task label is probably wrong" in warnings[0]
    right = tmp_path / "right.json"
    assert (
        main(["run", "--checkpoint", DIGITS, "--method", "task_arithmetic", "--samples", "48", "--out", str(right)])
        == 0
    )
    assert json.loads(right.read_text())["warnings"] == []


def test_saved_configurations_replay_from_another_directory(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    argv = ["run", "--preset", "mini-8", "--method", "opcm", "--samples", "32", "--order-seed", "42"]
    assert main([*argv, "--out", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    assert all(c["source"].startswith("assets/mini/checkpoints/") for c in config["checkpoints"])
    assert config["preset"] == "mini-8" and config["order_seed"] == 42
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "--config", str(out), "--out", "replay.json", "--device", "cpu"]) == 0
    replay = json.loads((elsewhere / "replay.json").read_text())
    assert replay["methods"]["opcm"]["accuracy"] == json.loads(out.read_text())["methods"]["opcm"]["accuracy"]
    outside = tmp_path / "gone.json"
    outside.write_text(
        json.dumps({"config": {"checkpoints": [{"source": "/gone/mini-digits", "task": "mini-digits"}]}})
    )
    assert "checkpoint not found: /gone/mini-digits" in one_line_error(capsys, ["run", "--config", str(outside)])


def test_the_command_line_runs_from_any_directory(tmp_path):
    """What ``pip install -e .`` gives: the package importable from anywhere, assets found in the checkout."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    done = subprocess.run(
        [sys.executable, "-m", "merging", "run", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "--preset" in done.stdout
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    from setuptools import find_packages

    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.parent.relative_to(PROJECT).as_posix().replace("/", ".") for p in PROJECT.glob("merging/**/__init__.py")
    }
    assert set(find_packages(str(PROJECT), include=include)) == packages  # every sub-package is installed
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
