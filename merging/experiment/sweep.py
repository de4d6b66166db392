"""A sweep's plan and its summary: which trials to run, where each one's results go, and what they add up to.

The papers report every number as a mean over ten task orders (seeds 42–51) and study a
method's sensitivity to its options. A sweep is the cartesian product of order seeds and, per
method, a grid of option values; each trial is exactly the configuration that ``python -m
merging run`` builds for one method, one order seed and one set of options, so its
results.json is the one that run writes. This module only plans and summarises (pure
functions, no torch): running the trials is :mod:`merging.experiment.sweep_runner`.

Layout of a sweep's folder: ``trials/NAME/seed-S.json`` (one results.json per trial, with
its CSV matrix beside it), ``summary.json``, ``table.md`` and ``table.csv``. A trial whose
results file is complete and was run with the same configuration counts as done, which is
what makes a sweep resumable.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from merging.errors import MergingError, OptionError
from merging.experiment.runner import CheckpointSpec, RunConfig, shuffled

PAPERS_ORDER_SEEDS = tuple(range(42, 52))  # the ten orders every number of the papers is averaged over
SUMMARY = "summary.json"
TABLE_MARKDOWN = "table.md"
TABLE_CSV = "table.csv"
TRIALS = "trials"
# Published numbers of real CLIP beside a preset: the standard presets on an OpenAI backbone, and
# the mini presets beside the real ViT-B/32 benchmark they mirror (as assets/mini/README.md does).
_SEED_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


# ---------------------------------------------------------------- parsing the flags


def parse_order_seeds(text: str) -> list[int]:
    """``42-51``, ``42,45,50-51`` → the seeds in the order written; empty ranges and repeats are errors."""
    seeds: list[int] = []
    for part in text.split(","):
        match = _SEED_PART.match(part.strip())
        if not match:
            raise MergingError(f"order seeds {text!r}: {part.strip()!r} is not a seed or a range such as 42-51")
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        if high < low:
            raise MergingError(f"order seeds {text!r}: the range {part.strip()} is empty (write LOW-HIGH)")
        for seed in range(low, high + 1):
            if seed in seeds:
                raise MergingError(f"order seeds {text!r}: seed {seed} is listed twice")
            seeds.append(seed)
    return seeds


def parse_grid(entries: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """``METHOD.KEY=V1,V2`` flags → {method: {key: [typed values]}}, each value range-checked by the method.

    Errors name the flag: a missing method, key or value, an unknown method or option, a
    value out of range, a key given twice or a value repeated.
    """
    from merging.methods import get_method

    grid: dict[str, dict[str, list[Any]]] = {}
    for entry in entries:
        target, sep, values_text = entry.partition("=")
        method, dot, key = target.strip().partition(".")
        if not sep or not dot or not method or not key:
            raise OptionError(f"grid {entry!r} is not METHOD.KEY=V1,V2,...")
        raw = [v.strip() for v in values_text.split(",")]
        if not values_text.strip() or any(not v for v in raw):
            raise OptionError(f"grid {entry!r}: give one or more values after '=', separated by commas")
        cls = get_method(method)
        if key in grid.get(method, {}):
            raise OptionError(f"grid {entry!r}: {method}.{key} is already in the grid; list every value once")
        values = []
        for value in raw:
            try:
                typed = cls.parse_options({key: value})[key]
            except OptionError as exc:
                raise OptionError(f"grid {entry!r}: {exc}") from None
            if typed in values:
                raise OptionError(f"grid {entry!r}: value {value} is listed twice")
            values.append(typed)
        grid.setdefault(method, {})[key] = values
    return grid


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Point:
    """One method with one set of options: a row of the sweep's table."""

    name: str  # the method, with the grid point when there is one: opcm[alpha=0.3]
    method: str
    options: dict[str, Any]  # the options given (base --opt and the grid point), as `run` records them

    @property
    def folder(self) -> str:
        """The trials' folder name: the row's name with only characters every file system accepts."""
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.name.replace("[", "-").replace("]", ""))


@dataclass(frozen=True)
class Trial:
    """One method point run over one order: exactly the configuration ``run`` builds for it."""

    point: Point
    order_seed: int
    config: RunConfig = field(compare=False)

    @property
    def name(self) -> str:
        return f"{self.point.name} seed {self.order_seed}"

    def results_path(self, out: Path) -> Path:
        return out / TRIALS / self.point.folder / f"seed-{self.order_seed}.json"


def show_value(value: Any) -> str:
    """An option value as one writes it on the command line: booleans lowercase, 10 for 10.0, 1e-05 exact."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value).removesuffix(".0")
    return str(value)


def points(base: Mapping[str, Mapping[str, Any]], grid: Mapping[str, Mapping[str, Sequence[Any]]]) -> list[Point]:
    """The rows: per method (those of ``--method``, then those only the grid names), its grid's product.

    A method without a grid is one row named by the method; a grid point overrides the
    method's ``--opt`` values for the keys it sets.
    """
    rows = []
    for method in [*base, *(m for m in grid if m not in base)]:
        options = dict(base.get(method, {}))
        axes = grid.get(method, {})
        if not axes:
            rows.append(Point(method, method, options))
            continue
        for values in itertools.product(*axes.values()):
            chosen = dict(zip(axes, values, strict=True))
            label = ",".join(f"{key}={show_value(value)}" for key, value in chosen.items())
            rows.append(Point(f"{method}[{label}]", method, {**options, **chosen}))
    return rows


def plan(
    template: RunConfig, checkpoints: Sequence[CheckpointSpec], rows: Sequence[Point], seeds: Sequence[int]
) -> list[Trial]:
    """Every trial, row by row and seed by seed: ``template`` with the row's method and options and the
    checkpoints shuffled by the seed, as ``run --order-seed S`` shuffles them."""
    if not seeds:
        raise MergingError("no order seeds: give --order-seeds, e.g. 42-51")
    return [
        Trial(
            row,
            seed,
            replace(
                template,
                checkpoints=shuffled(checkpoints, seed),
                methods={row.method: dict(row.options)},
                order_seed=seed,
            ),
        )
        for row in rows
        for seed in seeds
    ]


# ---------------------------------------------------------------- trial files


def finished_results(trial: Trial, out: Path) -> dict[str, Any] | None:
    """The trial's results.json if it is complete and was run with this trial's configuration, else None.

    A file that does not parse or stops short (a trial cut off while writing, or stopped) is
    run again; one run with another configuration (other samples, say) is an error, so a
    sweep never mixes numbers from two settings.
    """
    path = trial.results_path(out)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("completed_steps") != len(trial.config.checkpoints):
        return None
    if data.get("config") != json.loads(json.dumps(trial.config.to_json())):
        raise MergingError(
            f"{path} holds {trial.name} run with another configuration; give another --out or remove the file"
        )
    return data


def trial_row(trial: Trial, results: Mapping[str, Any] | None, out: Path, error: str | None = None) -> dict[str, Any]:
    """One entry of a row's ``runs`` in summary.json (fractions in [0, 1], as in results.json); its options
    are every option of the method, as results.json records them."""
    from merging.methods import get_method

    options = get_method(trial.point.method).parse_options(trial.point.options)
    row: dict[str, Any] = {"order_seed": trial.order_seed, "options": options}
    if results is None:
        row.update(acc=None, bwt=None, results=None, error=error or "not run")
        return row
    method = results["methods"][trial.point.method]
    path = trial.results_path(out)
    row.update(options=method["options"], acc=method["acc"], bwt=method["bwt"], results=str(path.relative_to(out)))
    return row


# ---------------------------------------------------------------- the summary


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; None for none), as the papers report them."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(config: Mapping[str, Any], rows: Sequence[Point], runs: Mapping[str, Sequence[dict[str, Any]]]) -> dict:
    """summary.json: the sweep's configuration and, per row, ACC and BWT over its finished orders."""
    methods = {}
    for row in rows:
        entries = list(runs.get(row.name, []))
        acc_mean, acc_std = mean_std([r["acc"] for r in entries if r["acc"] is not None])
        bwt_mean, bwt_std = mean_std([r["bwt"] for r in entries if r["bwt"] is not None])
        methods[row.name] = {
            "method": row.method,
            "acc_mean": acc_mean,
            "acc_std": acc_std,
            "bwt_mean": bwt_mean,
            "bwt_std": bwt_std,
            "runs": entries,
        }
    return {"config": dict(config), "methods": methods}


def published(config: Mapping[str, Any]) -> tuple[str, dict[str, dict[str, float]]]:
    """What the papers publish beside this sweep's preset: (what it is, {method: {"ACC", "BWT"}} in percent).

    Standard presets on an OpenAI backbone get that backbone's numbers; the mini presets
    the real ViT-B/32 benchmark they mirror. Empty when the preset has none.
    """
    from merging.evaluation.published import MINI_MIRRORS, config_setting, published_numbers
    from merging.methods import METHODS

    setting = config_setting(config, mirrors=True)
    if setting is None:
        return "", {}
    real, size = setting
    mirrored = str(config.get("preset")) in MINI_MIRRORS
    label = f"real CLIP {real}, {size} tasks" if mirrored else f"CLIP {real}, {size} tasks"
    numbers = published_numbers(setting, ("pretrained", "finetuned", *METHODS))
    return (label if numbers else ""), numbers


def _is_default(method: str, options: Mapping[str, Any]) -> bool:
    from merging.methods import get_method

    defaults = {o.name: o.default for o in get_method(method).options}
    return all(defaults.get(key) == value for key, value in options.items())


@dataclass
class TableRow:
    """One line of the papers' table, in percent (None: no number)."""

    name: str
    orders: int | None
    acc_mean: float | None
    acc_std: float | None = None
    bwt_mean: float | None = None
    bwt_std: float | None = None
    published_acc: float | None = None
    published_bwt: float | None = None


def table(
    summary: Mapping[str, Any], references: Mapping[str, Mapping[str, float]] | None
) -> tuple[str, list[TableRow]]:
    """The papers' table: the reference rows, then mean ± std per row, beside the published numbers.

    Returns what the published numbers are ("" when the preset has none) and the rows. A
    published number is shown only beside a row run at the method's default options (the
    papers' setting).
    """
    label, numbers = published(summary["config"])
    rows = []
    tasks = list(dict.fromkeys(c["task"] for c in summary["config"].get("checkpoints", [])))
    for name in ("pretrained", "finetuned"):
        values = (references or {}).get(name, {})
        if tasks and all(t in values for t in tasks):
            mean = 100 * statistics.fmean(values[t] for t in tasks)
            rows.append(TableRow(name, None, mean, published_acc=numbers.get(name, {}).get("ACC")))
    for name, data in summary["methods"].items():
        done = [r for r in data["runs"] if r["acc"] is not None]
        shown = numbers.get(data["method"], {}) if _is_default(data["method"], _options(data)) else {}
        rows.append(
            TableRow(
                name,
                len(done),
                *(None if v is None else 100 * v for v in (data["acc_mean"], data["acc_std"])),
                *(None if v is None else 100 * v for v in (data["bwt_mean"], data["bwt_std"])),
                shown.get("ACC"),
                shown.get("BWT"),
            )
        )
    return label, rows


def _options(data: Mapping[str, Any]) -> dict[str, Any]:
    runs = data.get("runs") or [{}]
    return dict(runs[0].get("options", {}))


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _mean_std(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return ""
    return _number(mean, signed) if std is None else f"{_number(mean, signed)} ± {std:.1f}"


def markdown_table(label: str, rows: Sequence[TableRow]) -> str:
    """The table as the papers print it: ACC and BWT in percent, mean ± std over the orders."""
    header = ["method", "orders", "ACC (%)", "BWT (%)"]
    if label:
        header += [f"published ACC ({label})", "published BWT"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row.name, "" if row.orders is None else str(row.orders)]
        cells += [_mean_std(row.acc_mean, row.acc_std), _mean_std(row.bwt_mean, row.bwt_std, signed=True)]
        if label:
            cells += [_number(row.published_acc), _number(row.published_bwt, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(label: str, rows: Sequence[TableRow]) -> str:
    """The same table with one number per cell (percent, full precision), for a spreadsheet."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["method", "orders", "acc_mean_pct", "acc_std_pct", "bwt_mean_pct", "bwt_std_pct"]
    if label:
        header += ["published_acc_pct", "published_bwt_pct", "published_on"]
    writer.writerow(header)
    for row in rows:
        cells = [row.name, row.orders, row.acc_mean, row.acc_std, row.bwt_mean, row.bwt_std]
        if label:
            cells += [row.published_acc, row.published_bwt, label]
        writer.writerow(["" if c is None else c for c in cells])
    return buffer.getvalue()
