"""How fast the lab is ready, and how fast the default run shows its first step.

    python benchmarks/app_startup.py [--port 7871]

Starts ``python app.py`` in a fresh process (imports included) and times until the page
answers; then submits the default run (mini, mini-8, OPCM, seen tasks, 500 images) through
gradio_client and times, from the submission, the first update (the reference rows) and the
first step's update (the first accuracy matrix). Run twice: with an empty cache, and warm
(what every later run of the app sees). Targets from the issue: ready ≤ 10 s, first live
update ≤ 3 s after Run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

READY_TARGET = 10.0
FIRST_UPDATE_TARGET = 3.0


def wait_ready(url: str, process: subprocess.Popen, limit: float = 120.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if process.poll() is not None:
            raise SystemExit(f"app.py exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(0.05)
    raise SystemExit("app.py did not answer within the limit")


def first_updates(url: str) -> tuple[float, float, float]:
    """Seconds from submitting the default run to its first update, its first step and its end.

    The run is the page's default (mini-8, OPCM, 500 test images), submitted through the named
    API as the README shows; a run that fails raises here instead of timing an error.
    """
    from gradio_client import Client

    client = Client(url, verbose=False)
    started = time.perf_counter()
    job = client.submit(methods=["opcm"], samples=500, api_name="/run")
    first = step = None
    while not job.done():
        count = len(job.outputs())
        now = time.perf_counter() - started
        if count >= 1 and first is None:
            first = now
        if count >= 2 and step is None:
            step = now
        time.sleep(0.02)
    total = time.perf_counter() - started
    status = job.result()[0]  # raises if the run failed
    if "Done in" not in status:  # the last step's status ends "Done in N s."
        raise SystemExit(f"the default run did not finish: {status}")
    return first or total, step or total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/"
    rows = []
    with tempfile.TemporaryDirectory(prefix="app-bench-") as cache:
        env = dict(os.environ, MERGING_CACHE=cache, GRADIO_SERVER_PORT=str(args.port))
        for label in ("cold cache", "warm cache"):
            started = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                ready = wait_ready(url, process)
                launched = time.perf_counter() - started
                first, step, total = first_updates(url)
            finally:
                process.terminate()
                process.wait(timeout=30)
            rows.append((label, launched, ready, first, step, total))
    print("python app.py, then the default run (mini-8, OPCM, 500 test images per task) via gradio_client")
    print(f"{'':<12}{'ready (s)':>11}{'first update':>14}{'first step':>12}{'whole run':>11}")
    for label, launched, _, first, step, total in rows:
        print(f"{label:<12}{launched:11.2f}{first:14.2f}{step:12.2f}{total:11.2f}")
    ready_ok = all(r[1] <= READY_TARGET for r in rows)
    first_ok = all(r[3] <= FIRST_UPDATE_TARGET for r in rows)
    step_ok = all(r[4] <= FIRST_UPDATE_TARGET for r in rows)
    print(
        f"targets: ready <= {READY_TARGET:.0f} s {'PASS' if ready_ok else 'FAIL'}; first live update <= "
        f"{FIRST_UPDATE_TARGET:.0f} s {'PASS' if first_ok else 'FAIL'} (first step's matrix: "
        f"{'PASS' if step_ok else 'FAIL'})"
    )


if __name__ == "__main__":
    main()
