"""A sweep against the same trials run one ``run`` process after another, and its cost model.

    python benchmarks/sweep.py [--orders 10] [--samples 500] [--workers N] [--skip-sequential]
    python benchmarks/sweep.py --scaling [--orders 4] [--methods opcm,task_arithmetic] [--ray]
    (either form: [--device auto|cpu|cuda], passed to every command; on a GPU machine, the
    sweep on one GPU and, with --scaling, its scaling from one to two workers)

Default: mini-8 × the papers' ten orders × the six classic methods (opcm, otmf, task_arithmetic,
weight_average, ties, magmax) at their default options, as one ``python -m merging sweep``
(local backend), timed from the command to its exit; then, in the same run, the baseline the
issue names: ten sequential ``python -m merging run --method <the six> --order-seed S``
processes, timed the same way. It prints both, the speed-up, and checks that every trial's
ACC and BWT equal those of the matching run. An untimed warm-up run first fills a private
cache (``MERGING_CACHE`` is a temporary folder), so both sides start with decoded images,
heads and reference rows on disk.

``--scaling`` checks the cost model of the README's "Sweeps" section at 1 and 2 workers
(local, and Ray with ``--ray``): wall ≈ setup + W / workers, where W = Σ over trials and steps
of (merge + eval) seconds, read from the trials' own results.json. The machine is shared with
other work: the load average is printed beside every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSIC = ("opcm", "otmf", "task_arithmetic", "weight_average", "ties", "magmax")
TARGET_SECONDS = 240.0


def command(*args: str, env: dict[str, str], checkout: Path = ROOT) -> tuple[float, str]:
    """Run ``python -m merging ARGS`` in ``checkout``; its wall time (imports included) and stdout."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "merging", *args], cwd=checkout, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"python -m merging {' '.join(args)} in {checkout} failed:\n{done.stderr}")
    return seconds, done.stdout


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def step_work(out: Path) -> tuple[float, int]:
    """W: the trials' merge + eval seconds, summed over every step, and the number of steps."""
    total, steps = 0.0, 0
    for path in (out / "trials").rglob("seed-*.json"):
        for method in json.loads(path.read_text())["methods"].values():
            for step in method["steps"]:
                total += step["merge_seconds"] + step["eval_seconds"]
                steps += 1
    return total, steps


def sweep_args(methods: list[str], orders: int, samples: int, out: Path, device: str) -> list[str]:
    args = ["sweep", "--preset", "mini-8", "--order-seeds", f"42-{41 + orders}", "--samples", str(samples)]
    args += ["--device", device]
    for method in methods:
        args += ["--method", method]
    return [*args, "--out", str(out)]


def headline(args: argparse.Namespace, env: dict[str, str], work: Path) -> None:
    methods = list(CLASSIC)
    workers = ["--workers", str(args.workers)] if args.workers else []
    sweep_seconds, _ = command(
        *sweep_args(methods, args.orders, args.samples, work / "sweep", args.device), *workers, env=env
    )
    print(f"sweep, {args.orders} orders x {len(methods)} methods: {sweep_seconds:.1f} s ({load()})", flush=True)
    total, steps = step_work(work / "sweep")
    print(f"  W = {total:.1f} s of merge + eval over {steps} steps", flush=True)
    if args.skip_sequential:
        return
    sequential = 0.0
    summary = json.loads((work / "sweep" / "summary.json").read_text())
    mismatches = 0
    for seed in range(42, 42 + args.orders):
        out = work / f"run-{seed}.json"
        run_args = ["run", "--preset", "mini-8", "--order-seed", str(seed), "--samples", str(args.samples)]
        run_args += ["--device", args.device]
        for method in methods:
            run_args += ["--method", method]
        seconds, _ = command(*run_args, "--out", str(out), env=env)
        sequential += seconds
        recorded = json.loads(out.read_text())["methods"]
        for method in methods:
            trial = next(r for r in summary["methods"][method]["runs"] if r["order_seed"] == seed)
            mismatches += (trial["acc"], trial["bwt"]) != (recorded[method]["acc"], recorded[method]["bwt"])
        print(f"  run --order-seed {seed}: {seconds:.1f} s ({load()})", flush=True)
    print(f"{args.orders} sequential run processes: {sequential:.1f} s")
    print(
        f"speed-up of the sweep: {sequential / sweep_seconds:.2f}x; target {TARGET_SECONDS:.0f} s: "
        f"{'met' if sweep_seconds <= TARGET_SECONDS else 'missed'}"
    )
    print(f"trials whose ACC/BWT differ from the matching run: {mismatches} of {args.orders * len(methods)}")


def scaling(args: argparse.Namespace, env: dict[str, str], work: Path) -> None:
    methods = args.methods.split(",")
    backends = ["local", *(["ray"] if args.ray else [])]
    print(f"cost model: mini-8 x {args.orders} orders x {', '.join(methods)}, {args.samples} test images per task")
    for backend in backends:
        rows = []
        for workers in (1, 2):
            out = work / f"{backend}-{workers}"
            extra = ["--workers", str(workers), "--backend", backend]
            seconds, _ = command(*sweep_args(methods, args.orders, args.samples, out, args.device), *extra, env=env)
            total, steps = step_work(out)
            rows.append((workers, seconds, total, steps))
            print(
                f"  {backend}, {workers} worker(s): wall {seconds:.1f} s, W {total:.1f} s over {steps} steps "
                f"({load()})",
                flush=True,
            )
        (_, wall1, work1, _), (w2, wall2, work2, _) = rows
        setup = wall1 - work1  # everything but the steps: imports, checks, shared inputs, starting workers
        print(
            f"  {backend}: setup {setup:.1f} s; at 2 workers the model gives {setup + work1 / w2:.1f} s from the "
            f"1-worker run alone (setup + W1/2) and {setup + work2 / w2:.1f} s with W measured at 2 workers "
            f"(setup + W2/2); measured {wall2:.1f} s; W2/W1 = {work2 / work1:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=None, help="order seeds 42.. (default 10; 4 with --scaling)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--workers", type=int, default=None, help="the sweep's --workers (default: its own)")
    parser.add_argument("--skip-sequential", action="store_true", help="time the sweep only")
    parser.add_argument("--scaling", action="store_true", help="check the cost model at 1 and 2 workers")
    parser.add_argument("--methods", default="opcm,task_arithmetic,weight_average", help="with --scaling")
    parser.add_argument("--ray", action="store_true", help="with --scaling: also the Ray backend")
    parser.add_argument("--device", default="auto", help="every command's --device (auto, cpu, cuda)")
    args = parser.parse_args()
    args.orders = args.orders or (4 if args.scaling else 10)
    with tempfile.TemporaryDirectory(prefix="sweep-benchmark-") as folder:
        work = Path(folder)
        env = {**os.environ, "MERGING_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
        warm = ["run", "--preset", "mini-8", "--method", "otmf", "--samples", str(args.samples)]
        warm += ["--device", args.device]
        seconds, _ = command(*warm, "--out", str(work / "warm.json"), env=env)  # images (test and train), heads, refs
        print(f"warm-up (untimed in the comparison): {seconds:.1f} s", flush=True)
        (scaling if args.scaling else headline)(args, env, work)


if __name__ == "__main__":
    main()
