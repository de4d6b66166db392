"""Two identical runs at once against one run alone: what the process's thread budget buys.

    python benchmarks/concurrent_runs.py [--method otmf] [--preset mini-8] [--checkpoints N]
                                         [--samples 500] [--device cpu] [--no-unbudgeted] [--repeat R]

Named baseline, measured in the same process: "one run alone" (one run on a worker thread,
as the app runs it, with the whole budget). Then two identical runs started together on two
threads: total wall time until both finish, and its ratio to the baseline (the issue's
target: at most 2.3× on the 2-core machine, i.e. no worse than running them one after the
other plus 15 %). Then, unless ``--no-unbudgeted``, the same pair with the budget bypassed
(each thread keeps the default count, all cores, as before the budget existed) to show what
it buys. A first run that is not timed decodes the images and computes heads and reference
rows into a private cache (``MERGING_CACHE`` is a temporary folder), so every timed run
starts warm. Each run builds its own :class:`ContinualRun`, as every session of the app does.
The load average is printed after every round: other work on the machine skews the figures,
so ``--repeat`` interleaves rounds and keeps each row's fastest.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import merging.experiment.runner
from merging.compute.memory import keep_freed_memory
from merging.compute.threads import usable_cores
from merging.experiment.runner import ContinualRun, RunConfig, preset_checkpoints

keep_freed_memory()  # as the app, whose concurrent runs this times, does at start-up

RATIO_TARGET = 2.3


def one_run(config: RunConfig, cache: Path) -> float:
    """Wall seconds of a whole run, references and evaluation included."""
    started = time.perf_counter()
    run = ContinualRun(config, cache_dir=cache)
    for _ in run.steps():
        pass
    return time.perf_counter() - started


def on_threads(count: int, work: Callable[[], float]) -> tuple[float, list[float]]:
    """Start ``count`` threads together; the wall time until all finish, and each one's own time."""
    ready = threading.Barrier(count + 1)
    own: list[float] = [0.0] * count
    errors: list[BaseException] = []

    def body(i: int) -> None:
        ready.wait()
        try:
            own[i] = work()
        except BaseException as exc:  # reported after the join, never lost in a thread
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(i,), name=f"run-{i}") for i in range(count)]
    for worker in workers:
        worker.start()
    ready.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, own


def without_budget(cores: int):
    """Every step's share becomes all cores, whatever else runs: the behaviour before the budget."""

    def all_cores() -> int:
        torch.set_num_threads(cores)
        return cores

    return mock.patch.object(merging.experiment.runner, "apply_share", all_cores)


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="otmf")
    parser.add_argument("--preset", default="mini-8")
    parser.add_argument("--checkpoints", type=int, default=None, help="only the first N of the preset")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-unbudgeted", action="store_true", help="skip the pair without the budget")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each row keeps its fastest")
    args = parser.parse_args()
    checkpoints = preset_checkpoints(args.preset)[: args.checkpoints]
    config = RunConfig(
        checkpoints=checkpoints, methods={args.method: {}}, samples=args.samples, device=args.device, preset=args.preset
    )
    warm = replace(config, methods={args.method: {"steps": 1} if args.method == "otmf" else {}})
    cores = usable_cores()
    policy = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ}
    with tempfile.TemporaryDirectory(prefix="concurrent-runs-") as tmp:
        cache = Path(tmp)
        os.environ["MERGING_CACHE"] = tmp
        print(f"load average before: {load()}", flush=True)
        # loads the backbone, decodes test and train images, builds heads and reference rows. On a thread
        # that then ends: torch work on the main thread would leave an OpenMP pool there, and with more
        # pooled threads than cores libgomp all but stops spinning, which slows every later run ~1.7x
        on_threads(1, lambda: one_run(warm, cache))
        alone, pair, unbudgeted = (float("inf"), []), (float("inf"), []), (float("inf"), [])
        for _ in range(args.repeat):  # interleaved, so a burst of other work hits one round, not one row
            alone = min(alone, on_threads(1, lambda: one_run(config, cache)))
            print(f"one run alone: {alone[0]:.2f} s", flush=True)
            pair = min(pair, on_threads(2, lambda: one_run(config, cache)))
            print(f"two at once (budget): {pair[0]:.2f} s", flush=True)
            if not args.no_unbudgeted:
                with without_budget(cores):
                    unbudgeted = min(unbudgeted, on_threads(2, lambda: one_run(config, cache)))
                print(f"two at once (no budget): {unbudgeted[0]:.2f} s", flush=True)
            print(f"load average: {load()}", flush=True)
    print(
        f"\n{args.method} on {args.preset} ({len(checkpoints)} checkpoints), {args.samples} test images per task, "
        f"{args.device}, {cores} cores, caches warm" + (f", {policy}" if policy else "")
    )
    rounds = f", best of {args.repeat}" if args.repeat > 1 else ""
    print(f"{'':<28}{'total s':>9}{'each run s':>16}{'vs one alone':>14}{rounds}")
    rows = {"one run alone (baseline)": alone, "two at once, budget": pair, "two at once, no budget": unbudgeted}
    for label, (total, each) in rows.items():
        if each:
            print(f"{label:<28}{total:9.2f}{' / '.join(f'{s:.1f}' for s in each):>16}{total / alone[0]:13.2f}x")
    ratio = pair[0] / alone[0]
    verdict = "PASS" if ratio <= RATIO_TARGET else "FAIL"
    print(f"target: two at once <= {RATIO_TARGET}x one alone: {verdict} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
