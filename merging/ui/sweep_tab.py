"""The Sweep tab's logic without any UI: a request checked → a planned sweep → streamed updates.

The page (:mod:`merging.ui.sweep_page`) only wires components to these functions. A sweep here
is the one ``python -m merging sweep`` runs (:mod:`merging.experiment.sweep`: the same plan, the
same trials, the same summary.json and tables through :class:`SweepRecord`), with three
differences that come from being an endpoint strangers can call: every value is checked and
bounded before anything is built (a grid's cartesian product is counted before it is made, an
order-seed range before it is expanded), the folder is the session's own (the caller hands it
in; nobody types a path), and the pool's size is this sweep's share of the process's cores
(:mod:`merging.compute.threads`), so a sweep never takes more threads than one run would.

The trials run in a background thread (the library's local pool, or Ray) that records each
outcome in the folder as it arrives; :func:`stream` yields an update per finished trial. A
stop event (the Stop button) starts no further trial and ends those in flight at their next
step; the finished ones stay in summary.json, the tables and the zip.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import queue
import re
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.errors import MergingError
from merging.evaluation.evaluator import DEFAULT_SAMPLES
from merging.experiment.sweep import (
    PAPERS_ORDER_SEEDS,
    SUMMARY,
    TABLE_CSV,
    TABLE_MARKDOWN,
    TRIALS,
    Point,
    Trial,
    parse_grid,
    parse_order_seeds,
    plan,
    points,
)
from merging.methods import METHODS
from merging.ui.hosting import SourcePolicy
from merging.ui.lab import LabRequest

BACKENDS = ("local", "ray")
EVAL_MODES = ("seen", "all")
DEFAULT_SEEDS = f"{PAPERS_ORDER_SEEDS[0]}-{PAPERS_ORDER_SEEDS[-1]}"
ZIP_NAME = "sweep.zip"
MAX_ORDERS = 100  # order seeds per sweep: the papers use 10
MAX_SEED = 2**32 - 1  # what numpy-style seeds accept; Python's random takes any, but a bound keeps text short
MAX_SEED_TEXT = 200
MAX_GRID_LINES = 16
MAX_GRID_TEXT = 4000
MAX_GRID_VALUES = 32  # per grid line
MAX_CHECKPOINTS = 64  # as a lab run (app.MAX_CHECKPOINTS)
HOSTED_SAMPLES = (16, 2000)  # as the lab's slider (app.HOSTED_SAMPLES): no whole Hub test sets for strangers
TRIALS_ENV = "MERGING_SWEEP_MAX_TRIALS"
HOSTED_MAX_TRIALS = 60  # a mini-8 sweep of six methods over ten orders; more takes a hosted CPU too long
LOCAL_MAX_TRIALS = 5000  # a bound on what one request builds, even on a private lab
_SEED_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


# ---------------------------------------------------------------- one-click ablations of the papers


@dataclass(frozen=True)
class Ablation:
    """A study from the papers as a grid: pressing its button sets the grid (and clears the methods)."""

    key: str
    title: str
    grid: tuple[str, ...]
    about: str


ABLATIONS = (
    Ablation(
        "opcm-alpha",
        "OPCM α 0.1–1.0",
        ("opcm.alpha=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",),
        "OPCM's sensitivity to the scaling α of the projected task vectors (OPCM, the α study).",
    ),
    Ablation(
        "opcm-projection",
        "OPCM projection variants",
        ("opcm.projection=block,two_sided", "opcm.zero_diagonal=true,false"),
        "Which part of a task vector OPCM removes: the block (left and right) projection or the two-sided one, "
        "with and without zeroing the diagonal.",
    ),
    Ablation(
        "otmf-alpha",
        "OTMF α 0.5–0.9",
        ("otmf.alpha=0.5,0.6,0.7,0.8,0.9",),
        "OTMF's weight α of the merged model's delta against the new task's (OTMF, the α study).",
    ),
    Ablation(
        "otmf-masks",
        "OTMF masks off",
        ("otmf.masks=on,off",),
        "OTMF with its learned masks against plain α-interpolation (masks off).",
    ),
    Ablation(
        "otmf-heads",
        "OTMF heads off",
        ("otmf.head_tuning=on,off",),
        "OTMF with each task's head tuned on the merged encoder against the zero-shot heads (heads off).",
    ),
)


def ablation(key: Any) -> Ablation:
    """The ablation named ``key``, or an error listing the valid keys."""
    for study in ABLATIONS:
        if study.key == key:
            return study
    raise MergingError(f"unknown ablation {key!r}; valid: {', '.join(a.key for a in ABLATIONS)}")


# ---------------------------------------------------------------- checking what a visitor sends


def ray_available() -> bool:
    """Whether the Ray backend can be offered: ``ray`` is installed (found without importing it)."""
    return importlib.util.find_spec("ray") is not None


def max_trials(hosted: bool) -> int:
    """Trials one sweep may have: ``MERGING_SWEEP_MAX_TRIALS``, else 60 hosted (5000 on a private lab)."""
    raw = os.environ.get(TRIALS_ENV, "").strip()
    if raw:
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            raise MergingError(f"{TRIALS_ENV}={raw!r} must be a whole number >= 1")
        return int(raw)
    return HOSTED_MAX_TRIALS if hosted else LOCAL_MAX_TRIALS


def _text(value: Any, what: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise MergingError(f"{what} must be text of at most {limit} characters")
    return value


def _whole(value: Any, what: str) -> int | None:
    """An optional whole number from a number field (Gradio sends floats)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MergingError(f"{what} must be a whole number, not {value!r}")
    if not float(value).is_integer():
        raise MergingError(f"{what} must be a whole number, not {value!r}")
    return int(value)


def order_seeds(text: Any) -> list[int]:
    """The order seeds (``42-51``, ``42,45,50-51``), each range's size and each seed bounded before it is expanded."""
    text = _text(text, "order seeds", MAX_SEED_TEXT).strip()
    if not text:
        raise MergingError(f"give order seeds, e.g. {DEFAULT_SEEDS} (the papers' ten orders)")
    count = 0
    for part in text.split(","):
        match = _SEED_PART.match(part.strip())
        if not match:
            continue  # parse_order_seeds names the part
        low, high = int(match[1]), int(match[2] or match[1])
        if max(low, high) > MAX_SEED:
            raise MergingError(f"order seeds {text!r}: {part.strip()} is above the largest seed, {MAX_SEED}")
        count += max(0, high - low + 1)
        if count > MAX_ORDERS:
            raise MergingError(f"order seeds {text!r}: at most {MAX_ORDERS} orders per sweep")
    return parse_order_seeds(text)


def grid_entries(text: Any) -> list[str]:
    """The grid's lines (``METHOD.KEY=V1,V2`` each; blank lines and ``#`` comments skipped), bounded."""
    text = _text(text, "grid", MAX_GRID_TEXT)
    lines = [line.strip() for line in text.splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    if len(entries) > MAX_GRID_LINES:
        raise MergingError(f"the grid has {len(entries)} lines; at most {MAX_GRID_LINES}")
    for entry in entries:
        if entry.count(",") + 1 > MAX_GRID_VALUES:
            raise MergingError(f"grid {entry!r}: at most {MAX_GRID_VALUES} values per line")
    return entries


def row_count(base: Sequence[str], grid: Mapping[str, Mapping[str, Sequence[Any]]]) -> int:
    """How many rows :func:`~merging.experiment.sweep.points` would make, counted without making them."""
    count = 0
    for method in [*base, *(m for m in grid if m not in base)]:
        axes = grid.get(method, {})
        count += math.prod(len(values) for values in axes.values()) if axes else 1
    return count


@dataclass
class SweepRequest:
    """What the Sweep tab holds, as typed values (see :func:`request_from_values` for what a script sends)."""

    backbone: str = "mini"
    preset: str | None = "mini-8"
    checkpoints: str = ""
    methods: list[str] = field(default_factory=list)
    grid: str = ""
    order_seeds: str = DEFAULT_SEEDS
    samples: int | None = DEFAULT_SAMPLES
    eval: str = "seen"
    device: str = "auto"
    backend: str = "local"


def request_from_values(
    backbone: Any,
    preset: Any,
    checkpoints: Any,
    methods: Any,
    grid: Any,
    seeds: Any,
    samples: Any,
    eval_mode: Any,
    device: Any,
    backend: Any,
    hosted: bool,
) -> SweepRequest:
    """The tab's values, each checked for type and range (an endpoint gets whatever a script sends)."""
    from merging.compute.devices import DEVICE_CHOICES

    if methods is None:
        methods = []
    if not isinstance(methods, list | tuple) or not all(isinstance(m, str) for m in methods):
        raise MergingError(f"methods must be a list of method names ({', '.join(METHODS)})")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MergingError(f"unknown method {unknown[0]!r}; valid methods: {', '.join(METHODS)}")
    count = _whole(samples, "test images per task")
    low, high = HOSTED_SAMPLES
    if hosted and (count is None or not low <= count <= high):
        raise MergingError(f"test images per task must be between {low} and {high} here, not {samples!r}")
    if count is not None and count < 0:
        raise MergingError(f"test images per task must be at least 1 (or 0 for all), not {count}")
    if eval_mode not in EVAL_MODES:
        raise MergingError(f"evaluate tasks must be one of {', '.join(EVAL_MODES)}, not {eval_mode!r}")
    if device not in DEVICE_CHOICES:
        raise MergingError(f"device must be one of {', '.join(DEVICE_CHOICES)}, not {device!r}")
    if backend not in BACKENDS:
        raise MergingError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "ray" and hosted:
        raise MergingError("the ray backend is off on a hosted lab: use local")
    text = _text(checkpoints, "checkpoint list", 100_000)
    if sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#")) > MAX_CHECKPOINTS:
        raise MergingError(f"at most {MAX_CHECKPOINTS} checkpoints per sweep")
    return SweepRequest(
        backbone=_text(backbone, "backbone", 500).strip() or "mini",
        preset=_text(preset, "preset", 200).strip() or None,
        checkpoints=text,
        methods=list(dict.fromkeys(methods)),
        grid=_text(grid, "grid", MAX_GRID_TEXT),
        order_seeds=_text(seeds, "order seeds", MAX_SEED_TEXT),
        samples=count or None,
        eval=eval_mode,
        device=device,
        backend=backend,
    )


# ---------------------------------------------------------------- the plan


@dataclass
class SweepPlan:
    """A checked request as the library's sweep: rows, trials and summary.json's configuration."""

    rows: list[Point]
    trials: list[Trial]
    config: dict[str, Any]
    backend: str

    @property
    def total(self) -> int:
        return len(self.trials)

    def describe(self) -> str:
        first = self.trials[0].config
        return (
            f"{len(self.rows)} rows × {len(self.config['order_seeds'])} orders = {self.total} trials; "
            f"{len(first.checkpoints)} checkpoints; {first.samples or 'all'} test images per task; "
            f"backend {self.backend}"
        )


def plan_sweep(request: SweepRequest, policy: SourcePolicy, hosted: bool) -> SweepPlan:
    """Every value checked and every trial planned, in the order a visitor reads the errors: grid, orders,
    size, then the checkpoints and backbone through the session's source policy. Nothing runs here."""
    from merging.cli.sweep import sweep_config
    from merging.io.sources import check_no_duplicates

    grid = parse_grid(grid_entries(request.grid))  # an unknown method or option, or a value out of range
    seeds = order_seeds(request.order_seeds)
    if not request.methods and not grid:
        raise MergingError("choose at least one method, or give a grid (or press an ablation)")
    limit = max_trials(hosted)
    trials = row_count(request.methods, grid) * len(seeds)
    if trials > limit:
        raise MergingError(
            f"this sweep has {trials} trials (rows × {len(seeds)} orders); at most {limit} per sweep here: "
            "fewer orders or grid values"
        )
    base = {m: {} for m in request.methods}
    methods = [*request.methods, *(m for m in grid if m not in base)]
    template = LabRequest(
        backbone=request.backbone,
        checkpoints=request.checkpoints,
        methods=methods,
        samples=request.samples,
        eval=request.eval,
        device=request.device,
        preset=request.preset,
    ).config(policy)
    checkpoints = list(template.checkpoints)
    check_no_duplicates([c.source for c in checkpoints], False)
    rows = points(base, grid)
    planned = plan(template, checkpoints, rows, seeds)
    flags = argparse.Namespace(backend=request.backend, workers=None, ray_address=None)
    config = sweep_config(template, checkpoints, seeds, base, grid, flags)
    return SweepPlan(rows, planned, config, request.backend)


# ---------------------------------------------------------------- running it


@dataclass
class SweepUpdate:
    """The sweep after ``done`` of ``total`` trials: what the tab shows.

    ``summary`` is summary.json's content (a copy, safe to keep), ``references`` the reference
    rows (for the table's pretrained and fine-tuned lines), ``files`` the downloads so far.
    """

    done: int
    total: int
    failed: int
    status: str
    log: list[str]
    summary: dict[str, Any]
    references: dict[str, dict[str, float]] | None
    files: list[Path]
    finished: bool = False


def pool_workers(device: str, pending: int) -> int | None:
    """The local pool's size: this sweep's share of the cores (the runs in flight counted); None on CUDA.

    Each trial holds a slot of the thread budget while it runs, so the trials' threads add up to
    the cores at most; the pool never has more workers than trials to run. On CUDA the backends
    size themselves to the trials that fit in the GPUs' memory budget
    (:mod:`merging.experiment.gpu_budget`), so several trials share a GPU as on the command line.
    """
    from merging.compute.devices import resolve_device
    from merging.compute.threads import runs_in_flight, usable_cores

    if resolve_device(device).type == "cuda":
        return None
    workers = max(1, usable_cores() // (runs_in_flight() + 1))
    return max(1, min(workers, pending))


_RAY_LOCK = threading.Lock()  # one Ray sweep per process: each starts and shuts down its own local instance


class _StopRay(Exception):
    """Raised from the Ray backend's callback to end it after a Stop (Ray cancels the tasks in flight)."""


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return "▓" * filled + "░" * (width - filled)


def stream(
    planned: SweepPlan, folder: Path, stop: threading.Event, workers: int | None = None
) -> Iterator[SweepUpdate]:
    """Run the planned sweep into ``folder`` (the session's), yielding an update per finished trial.

    The first update comes before any work; then the shared inputs are computed (a bad
    checkpoint or dataset fails here, before any trial); then the trials run on a background
    thread, each recorded in the folder as it ends. ``stop`` set (the Stop button) ends the
    sweep early, keeping every finished trial; closing the iterator does the same. The last
    update carries the zip of every trial and ``finished=True``.
    """
    from merging.experiment.sweep_record import SweepRecord
    from merging.experiment.sweep_runner import prepare_shared, run_local

    started = time.perf_counter()
    record = SweepRecord(folder, planned.config, planned.rows, planned.trials)
    pending = record.resume()
    total = planned.total
    log: list[str] = [f"sweep: {planned.describe()}"]
    record.write()

    def update(status: str, done: int, failed: int, files: list[Path], finished: bool = False) -> SweepUpdate:
        summary = json.loads(json.dumps(record.summary()))
        return SweepUpdate(done, total, failed, status, list(log), summary, record.references, files, finished)

    yield update(f"{planned.describe()}. Checking inputs and preparing what every trial shares…", 0, 0, [])
    shared = prepare_shared(pending)  # MergingError: the caller shows it; nothing ran
    log.append(f"shared inputs ready ({time.perf_counter() - started:.1f} s)")
    count = workers or pool_workers(planned.trials[0].config.device, len(pending))
    outcomes: queue.Queue[Any] = queue.Queue()
    finished_marker = object()
    state = {"done": total - len(pending), "failed": 0}

    def on_done(outcome: Any) -> None:  # runs on the background thread, one outcome at a time
        state["done"] += 1
        state["failed"] += outcome.results is None
        record.record(outcome)
        # the counts travel with the line: the next trial may finish before this update is shown
        outcomes.put((state["done"], state["failed"], record.progress(outcome, state["done"], total)))
        if planned.backend == "ray" and stop.is_set():
            raise _StopRay

    def work() -> None:
        try:
            if planned.backend == "ray":
                run_on_ray(pending, shared, count, on_done, planned.trials[0].config.device)
            else:
                run_local(pending, shared, count, on_done, planned.trials[0].config.device, stop=stop)
        except _StopRay:
            pass
        except BaseException as exc:  # shown in the status; the finished trials stay recorded
            outcomes.put(exc)
        finally:
            outcomes.put(finished_marker)

    thread = threading.Thread(target=work, name="sweep-tab", daemon=True)
    thread.start()
    error: BaseException | None = None
    try:
        while True:
            item = outcomes.get()
            if item is finished_marker:
                break
            if isinstance(item, BaseException):
                error = item
                continue
            done, failed, line = item
            log.append(line)
            elapsed = time.perf_counter() - started
            left = elapsed / max(1, done) * (total - done)
            status = (
                f"`{progress_bar(done, total)}` **{done} of {total} trials**"
                + (f" ({failed} failed)" if failed else "")
                + f" · {elapsed:.0f} s · about {left:.0f} s left"
                + (" · stopping…" if stop.is_set() else "")
                + f"\n\n{line}"
            )
            yield update(status, done, failed, _downloads(folder))
    finally:
        if thread.is_alive():  # the iterator was closed early: end the trials and wait for them
            stop.set()
            thread.join()
    written = record.write()
    archive = write_zip(folder)
    done, failed = state["done"], state["failed"]
    seconds = time.perf_counter() - started
    if error is not None:
        reason = str(error) if isinstance(error, MergingError) else f"{type(error).__name__}: {error}"
        status = f"**Error:** {' '.join(reason.split())}. The {record.finished} finished trials of {total} are kept."
    elif stop.is_set() and done < total:
        status = (
            f"**Stopped** after {seconds:.0f} s: the {record.finished} finished trials of {total} are kept in the "
            "summary, the table and the zip."
        )
    else:
        status = f"**Done:** {total} trials in {seconds:.0f} s" + (f"; {failed} failed (see the log)" if failed else "")
    log.append(status.replace("**", ""))
    yield update(status, done, failed, [*written, archive], finished=True)


def run_on_ray(trials: Sequence[Trial], shared: Any, workers: int | None, on_done: Any, device: str) -> None:
    """The Ray backend on a local instance, one sweep at a time per process (each starts and stops Ray)."""
    from merging.experiment.sweep_ray import import_ray, run_ray

    import_ray()  # missing: the one line saying how to install it
    if not _RAY_LOCK.acquire(blocking=False):
        raise MergingError("another sweep of this lab is using Ray; wait for it, or use the local backend")
    try:
        run_ray(trials, shared, workers, on_done, None, device)
    finally:
        _RAY_LOCK.release()


def _downloads(folder: Path) -> list[Path]:
    return [p for p in (folder / SUMMARY, folder / TABLE_MARKDOWN, folder / TABLE_CSV) if p.is_file()]


def write_zip(folder: Path) -> Path:
    """Every trial's results.json and CSV matrices, with summary.json and the tables, as ``sweep.zip`` in ``folder``."""
    target = folder / ZIP_NAME
    temporary = folder / f".{ZIP_NAME}.partial"
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in (SUMMARY, TABLE_MARKDOWN, TABLE_CSV):
            if (folder / name).is_file():
                archive.write(folder / name, name)
        trials = folder / TRIALS
        if trials.is_dir():
            for path in sorted(trials.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    archive.write(path, path.relative_to(folder).as_posix())
    temporary.replace(target)
    return target
