"""The Sweep tab's Ray path: the /sweep handler with backend "ray" on a local Ray instance gives the
local backend's numbers, trial for trial.

A tiny sweep: three mini-8 checkpoints, weight averaging and task arithmetic at one grid point,
two orders, 16 test images per task (4 trials). Ray starts its own local instance (as many CPUs
as the tab's pool has workers) and shuts it down at the end, as in the app.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merging.ui import lab, sweep_page
from merging.ui.hosting import Workspaces

from .test_sweep import without_timings

THREE = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:3])


def inputs(backend: str) -> list:
    """The /sweep endpoint's inputs as a script sends them."""
    return [
        "mini",  # backbone
        "mini-8",  # preset
        THREE,  # checkpoints
        ["weight_average"],  # methods
        "task_arithmetic.scaling=0.5",  # grid
        "42,43",  # order seeds
        16,  # samples
        "seen",  # eval mode
        "cpu",  # device
        backend,
    ]


def sweep(tmp_path: Path, backend: str) -> tuple[list, dict, Path]:
    """Run the tab's handler to the end; its updates, summary.json and the sweep's folder."""
    tabs = sweep_page.SweepHandlers(Workspaces(tmp_path / backend), False)
    updates = list(tabs.run(None, *inputs(backend)))
    assert tabs.active == {}
    files = {Path(f).name: Path(f) for f in updates[-1][5]}
    summary = files["summary.json"]
    return updates, json.loads(summary.read_text()), summary.parent


@pytest.mark.slow
def test_the_tabs_ray_backend_gives_the_local_backends_numbers(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from merging.experiment import sweep_ray

    real, calls = sweep_ray.run_ray, []

    def watched(trials, *args, **kwargs):  # the trials went to Ray, on an instance the tab started
        calls.append(len(trials))
        real(trials, *args, **kwargs)
        assert not ray.is_initialized()  # and shut down again

    monkeypatch.setattr(sweep_ray, "run_ray", watched)
    local_updates, local, local_folder = sweep(tmp_path, "local")
    assert calls == []
    ray_updates, remote, ray_folder = sweep(tmp_path, "ray")
    assert calls == [4]

    assert local_updates[-1][0].startswith("**Done:** 4 trials")
    statuses = [u[0] for u in ray_updates]
    assert "2 rows × 2 orders = 4 trials" in statuses[0] and "backend ray" in statuses[0]
    assert statuses[-1].startswith("**Done:** 4 trials") and "failed" not in statuses[-1]
    assert sum(f"**{n} of 4 trials**" in s for n in range(1, 5) for s in statuses) == 4
    assert remote["config"]["backend"] == "ray" and local["config"]["backend"] == "local"

    assert list(remote["methods"]) == ["weight_average", "task_arithmetic[scaling=0.5]"]
    assert remote["methods"] == local["methods"]  # ACC, BWT, their means and stds, the options, the paths
    for row in local["methods"].values():
        assert [r["order_seed"] for r in row["runs"]] == [42, 43]
        for run in row["runs"]:
            assert run["acc"] is not None
            ours, theirs = (json.loads((folder / run["results"]).read_text()) for folder in (local_folder, ray_folder))
            assert without_timings(theirs) == without_timings(ours)
    assert (ray_folder / "table.csv").read_text() == (local_folder / "table.csv").read_text()
