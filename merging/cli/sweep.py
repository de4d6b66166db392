"""``python -m merging sweep``: the papers' protocol in one command, over orders and option grids.

Every flag of ``run`` that says what to run is accepted here and means the same; the sweep
adds the orders (``--order-seeds``), option grids (``--grid``), where trials run
(``--backend``, ``--ray-address``, ``--workers``, ``--gpu-memory-budget``) and a folder for
everything (``--out``). Everything is checked before the first trial, like ``run``: bad input
is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.cli.run import add_experiment_flags, add_tracker_flag, config_from_args
from merging.errors import MergingError
from merging.experiment.gpu_budget import DEFAULT_FRACTION, Budget, parse_budget
from merging.experiment.runner import CheckpointSpec, RunConfig
from merging.experiment.sweep import (
    PAPERS_ORDER_SEEDS,
    SUMMARY,
    TABLE_CSV,
    TABLE_MARKDOWN,
    Point,
    Trial,
    parse_grid,
    parse_order_seeds,
    plan,
    points,
    show_value,
)
from merging.io.outputs import check_outputs
from merging.io.sources import check_no_duplicates, portable

BACKENDS = ("local", "ray")
DEFAULT_OUT = "sweep"


def positive_int(text: str) -> int:
    """A whole number ≥ 1 (argparse turns the ValueError into a one-line error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "whole number >= 1"


def add_sweep_parser(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run methods over several task orders and option grids; mean ± std per method",
        description="Run every method (and every point of its option grid) over several task orders, each trial "
        "exactly the run `python -m merging run --order-seed S` makes, and write one results.json per trial, "
        "summary.json and the papers' table (mean ± std) in --out. Trials already in --out are skipped.",
    )
    add_experiment_flags(sweep)
    sweep.add_argument(
        "--order-seeds",
        default=f"{PAPERS_ORDER_SEEDS[0]}-{PAPERS_ORDER_SEEDS[-1]}",
        metavar="SEEDS",
        help="order seeds: ranges and comma lists, e.g. 42-51 (the papers' ten orders, the default) or 42,45,50-51",
    )
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD.KEY=V1,V2,...",
        help="values of one method option to sweep (repeatable; the cartesian product per method); a method named "
        "only here is run too",
    )
    sweep.add_argument(
        "--backend", choices=BACKENDS, default="local", help="where trials run: this process's pool or a Ray cluster"
    )
    sweep.add_argument(
        "--ray-address",
        metavar="ADDR",
        default=None,
        help="the Ray cluster to use, e.g. ray://head:10001 or auto (default: start a local Ray instance)",
    )
    sweep.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="trials at once (default: local, the usable CPU cores, or on GPUs as many as fit in "
        "--gpu-memory-budget, one per core at most; ray, as many as the cluster's resources allow)",
    )
    sweep.add_argument(
        "--gpu-memory-budget",
        metavar="BUDGET",
        default=None,
        help="GPU memory the trials on one GPU may use together: a fraction of its free memory at the start "
        f"(default {DEFAULT_FRACTION:g}; also 90%%) or an amount (40GiB); trials share a GPU while their "
        "estimated peaks fit in it",
    )
    sweep.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"the sweep's folder: summary.json, {TABLE_MARKDOWN}, {TABLE_CSV}, trials/NAME/seed-S.json "
        f"(default: {DEFAULT_OUT})",
    )
    add_tracker_flag(sweep)


@dataclass
class PreparedSweep:
    """A sweep checked and planned: its rows, trials, folder and how to run them."""

    out: Path
    rows: list[Point]
    trials: list[Trial]
    config: dict[str, Any]  # summary.json's "config"
    backend: str
    workers: int | None
    ray_address: str | None
    tracker: str | None = None
    gpu_budget: Budget = field(default_factory=Budget)


def sweep_config(
    template: RunConfig,
    checkpoints: list[CheckpointSpec],
    seeds: list[int],
    base: dict[str, dict[str, Any]],
    grid: dict[str, dict[str, list[Any]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """What summary.json records: enough to run the sweep again with the same flags."""
    return {
        "backbone": template.backbone,
        "preset": template.preset,
        "checkpoints": [{"source": portable(c.source), "task": c.task} for c in checkpoints],
        "samples": template.samples,
        "eval": template.eval,
        "device": template.device,
        "allow_duplicates": template.allow_duplicates,
        "order_seeds": list(seeds),
        "methods": base,
        "grid": {m: {k: [show_value(v) for v in values] for k, values in axes.items()} for m, axes in grid.items()},
        "backend": args.backend,
        "workers": args.workers,
        "ray_address": args.ray_address,
        "gpu_memory_budget": getattr(args, "gpu_memory_budget", None),
    }


def prepare_sweep(args: argparse.Namespace) -> PreparedSweep:
    """Every flag checked and every trial planned before any work; the output folder probed."""
    seeds = parse_order_seeds(args.order_seeds)
    grid = parse_grid(args.grid)
    if args.ray_address and args.backend != "ray":
        raise MergingError("--ray-address needs --backend ray")
    gpu_budget = parse_budget(args.gpu_memory_budget)
    if args.gpu_memory_budget is not None and args.device == "cpu":
        raise MergingError("--gpu-memory-budget is for trials on GPUs, and --device cpu runs them on the CPU")
    if args.backend == "ray":
        from merging.experiment.sweep_ray import import_ray

        import_ray()  # missing: one line saying how to install it, before any work
    if args.tracker:
        from merging.experiment.tracking import check_tracker

        check_tracker(args.tracker)  # likewise a missing tracker package
    methods = list(args.method)
    if "all" not in methods:
        methods += [m for m in grid if m not in methods]
    flags = argparse.Namespace(**{**vars(args), "method": methods, "config": None, "order_seed": None})
    template = config_from_args(flags)  # the run's own checks: preset or checkpoints, methods, options
    checkpoints = list(template.checkpoints)  # unshuffled: each trial shuffles by its seed
    check_no_duplicates([c.source for c in checkpoints], template.allow_duplicates)
    base = template.methods
    rows = points(base, grid)
    trials = plan(template, checkpoints, rows, seeds)
    out = Path(args.out)
    outputs = [out / SUMMARY, out / TABLE_MARKDOWN, out / TABLE_CSV]
    outputs += list(dict.fromkeys(t.results_path(out) for t in trials))
    check_outputs(outputs, [c.source for c in checkpoints])
    config = sweep_config(template, checkpoints, seeds, base, grid, args)
    return PreparedSweep(
        out, rows, trials, config, args.backend, args.workers, args.ray_address, args.tracker, gpu_budget
    )


def run_sweep(prepared: PreparedSweep) -> int:
    """Run the trials not yet in the folder, printing a line per finished trial; Ctrl-C keeps what finished."""
    from merging.experiment.sweep_record import SweepRecord
    from merging.experiment.sweep_runner import prepare_shared

    record = SweepRecord(prepared.out, prepared.config, prepared.rows, prepared.trials)
    pending = record.resume()
    total = len(prepared.trials)
    skipped = total - len(pending)
    first = prepared.trials[0].config
    print(
        f"sweep: {len(prepared.rows)} method rows x {len(prepared.config['order_seeds'])} orders = {total} trials; "
        f"backbone {first.backbone}; {len(first.checkpoints)} checkpoints; {first.samples or 'all'} test images "
        f"per task; backend {prepared.backend}"
        + (f"; {skipped} finished trials found in {prepared.out}, skipped" if skipped else ""),
        flush=True,
    )
    if not pending:
        record.write()
        print(_table_text(prepared.out))
        return 0
    shared = prepare_shared(pending)
    tracker = open_sweep_tracker(prepared)
    done = skipped
    failed = 0

    def on_done(outcome) -> None:
        nonlocal done, failed
        done += 1
        failed += outcome.results is None
        record.record(outcome)
        print(record.progress(outcome, done, total), flush=True)
        if tracker is not None and outcome.results is not None:
            log_trial(tracker, prepared, outcome)

    try:
        if prepared.backend == "ray":
            from merging.experiment.sweep_ray import run_ray

            run_ray(
                pending,
                shared,
                prepared.workers,
                on_done,
                prepared.ray_address,
                first.device,
                gpu_budget=prepared.gpu_budget,
            )
        else:
            from merging.experiment.sweep_runner import run_local

            # workers None: run_local sizes the pool (the usable cores, or the trials that fit on the GPUs)
            run_local(pending, shared, prepared.workers, on_done, first.device, gpu_budget=prepared.gpu_budget)
    except KeyboardInterrupt:
        written = record.write()
        if tracker is not None:
            tracker.finish(record.summary(), written)
        raise MergingError(
            f"interrupted; the {record.finished} finished trials of {total} are kept in {prepared.out} "
            "(run the same command again to resume)"
        ) from None
    written = record.write()
    if tracker is not None:
        tracker.finish(record.summary(), written)
        print(f"logged {done - skipped - failed} trials to {prepared.tracker}", flush=True)
    print(_table_text(prepared.out))
    print(f"wrote {prepared.out / SUMMARY}, {prepared.out / TABLE_MARKDOWN}, {prepared.out / TABLE_CSV}")
    if failed:
        where = prepared.out / SUMMARY
        print(f"error: {failed} of {total} trials failed; their errors are in {where}", file=sys.stderr)
        return 1
    return 0


def open_sweep_tracker(prepared: PreparedSweep):
    """The sweep's tracker, its trials grouped: an MLflow parent run, or ``DIR/tensorboard/`` (None without one)."""
    if prepared.tracker is None:
        return None
    from merging.experiment.tracking import open_tracker

    params = {k: v for k, v in prepared.config.items() if k != "checkpoints"}
    params["checkpoints"] = len(prepared.config["checkpoints"])
    return open_tracker(prepared.tracker, prepared.out / "tensorboard", f"sweep {prepared.out.name}", params)


def log_trial(tracker, prepared: PreparedSweep, outcome) -> None:
    """A finished trial in the tracker (already written to the folder: a tracker failure is a warning)."""
    trial = outcome.trial
    path = trial.results_path(prepared.out)
    files = [path, path.with_name(f"{path.stem}.{trial.point.method}.csv")]
    try:
        tracker.log_run(outcome.results, files, trial.name, folder=f"{trial.point.folder}/seed-{trial.order_seed}")
    except Exception as exc:
        reason = " ".join(str(exc).split())
        print(f"warning: --tracker {prepared.tracker} could not log {trial.name}: {reason}", file=sys.stderr)


def _table_text(out: Path) -> str:
    return (out / TABLE_MARKDOWN).read_text().rstrip("\n")
