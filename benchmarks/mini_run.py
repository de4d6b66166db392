"""Speed of the default run: mini backbone, preset mini-8, OPCM, seen tasks, 500 test images.

    python benchmarks/mini_run.py [--methods opcm ...] [--device cpu]

Imports are excluded (the app pays them once at start-up). Measured twice in one process:
with an empty cache (images decoded, heads and reference rows computed) and with the
caches warm (what every later run of the app sees). Targets from the issue: the first step
within 3 s and the whole run within 15 s on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.compute.memory import keep_freed_memory
from merging.evaluation.backbones import load_backbone
from merging.evaluation.evaluator import Evaluator
from merging.experiment.runner import ContinualRun, RunConfig, preset_checkpoints

keep_freed_memory()  # as the app, whose runs this times, does at start-up

FIRST_STEP_TARGET = 3.0
TOTAL_TARGET = 15.0


def timed_run(config: RunConfig, cache: Path, evaluator: Evaluator | None = None) -> tuple[float, float, dict]:
    started = time.perf_counter()
    run = ContinualRun(config, evaluator=evaluator, cache_dir=cache)
    first = None
    for _ in run.steps():
        if first is None:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started, run.results().to_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["opcm"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="mini-8")
    args = parser.parse_args()
    started = time.perf_counter()
    load_backbone("mini")
    print(f"loading the mini backbone: {time.perf_counter() - started:.2f} s (once per process)")
    config = RunConfig(
        checkpoints=preset_checkpoints(args.preset),
        methods={m: {} for m in args.methods},
        device=args.device,
        preset=args.preset,
    )
    with tempfile.TemporaryDirectory(prefix="mini-run-cache-") as tmp:
        cache = Path(tmp)
        cold_first, cold_total, _ = timed_run(config, cache)
        warm_first, warm_total, results = timed_run(config, cache)
    print(f"{args.preset}, {', '.join(args.methods)}, seen tasks, {config.samples} test images per task, {args.device}")
    print(f"{'':<12}{'first step (s)':>16}{'whole run (s)':>15}")
    print(f"{'cold cache':<12}{cold_first:16.2f}{cold_total:15.2f}")
    print(f"{'warm cache':<12}{warm_first:16.2f}{warm_total:15.2f}")
    ok_first, ok_total = cold_first <= FIRST_STEP_TARGET, cold_total <= TOTAL_TARGET
    print(
        f"targets (cold): first step <= {FIRST_STEP_TARGET:.0f} s {'PASS' if ok_first else 'FAIL'}, "
        f"whole run <= {TOTAL_TARGET:.0f} s {'PASS' if ok_total else 'FAIL'}"
    )
    for name, data in results["methods"].items():
        merge = sum(s["merge_seconds"] for s in data["steps"])
        evaluate = sum(s["eval_seconds"] for s in data["steps"])
        print(
            f"{name}: ACC {100 * data['acc']:.1f}, BWT {100 * (data['bwt'] or 0):.1f}; "
            f"merging {merge:.2f} s, evaluation {evaluate:.2f} s (warm)"
        )


if __name__ == "__main__":
    main()
