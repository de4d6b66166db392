"""Several visitors at once, through gradio_client against the hosted app (slow; CI runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from merging.cli.main import main
from merging.compute.devices import peak_memory_bytes
from merging.ui import lab

from .test_app import SAMPLES, lab_inputs

pytestmark = pytest.mark.slow
SESSIONS = 4
QUEUE_MAX = 16  # what the served app is queued with (tests/conftest.py, app.main)


def test_four_sessions_at_once_finish_with_the_command_lines_results(served_hosted_app, tmp_path):
    from gradio_client import Client

    three = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:3])
    jobs = [
        Client(served_hosted_app, verbose=False).submit(*lab_inputs(checkpoints=three), api_name="/run")
        for _ in range(SESSIONS)
    ]
    queued = httpx.get(f"{served_hosted_app.rstrip('/')}/gradio_api/queue/status").json()["queue_size"]
    assert queued <= min(QUEUE_MAX, SESSIONS)
    finals = [job.result() for job in jobs]
    downloads = [
        json.loads(Path(next(f for f in final[5] if f.endswith("results.json"))).read_text()) for final in finals
    ]
    out = tmp_path / "cli.json"
    checkpoints = [flag for line in three.splitlines() for flag in ("--checkpoint", line)]
    argv = ["run", *checkpoints, "--method", "opcm", "--samples", str(SAMPLES), "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    cli = json.loads(out.read_text())
    for results in downloads:
        assert results["completed_steps"] == 3
        assert results["methods"]["opcm"]["accuracy"] == cli["methods"]["opcm"]["accuracy"]
    print(f"peak resident memory of the process serving {SESSIONS} sessions: {peak_memory_bytes() / 2**20:.0f} MiB")
