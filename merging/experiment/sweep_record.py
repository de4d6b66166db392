"""A sweep's folder as the sweep goes: finished trials found there, each outcome written as it arrives.

Whatever runs the trials (the local pool, Ray, the app), the folder is kept the same way:
each trial's results.json (and CSV matrix) is written by the function ``run`` writes with,
and ``summary.json``, ``table.md`` and ``table.csv`` are rewritten after every trial,
atomically, so an interrupted or crashed sweep leaves a valid summary of what finished.
Finished trials found in the folder are not run again (:meth:`SweepRecord.resume`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merging.experiment.runner import save_results
from merging.experiment.sweep import (
    SUMMARY,
    TABLE_CSV,
    TABLE_MARKDOWN,
    Point,
    Trial,
    csv_table,
    finished_results,
    markdown_table,
    summarise,
    table,
    trial_row,
)
from merging.experiment.sweep_runner import Outcome
from merging.io.disk_cache import write_atomic


class SweepRecord:
    """The sweep's folder ``out``: its trials' rows so far, and the summary and tables written from them."""

    def __init__(self, out: Path, config: Mapping[str, Any], rows: Sequence[Point], trials: Sequence[Trial]):
        self.out = Path(out)
        self.config = dict(config)
        self.rows = list(rows)
        self.trials = list(trials)
        self.entries: dict[tuple[str, int], dict[str, Any]] = {}
        self.references: dict[str, dict[str, float]] | None = None

    def resume(self) -> list[Trial]:
        """Take in the finished trials already in the folder; return the trials still to run, in plan order."""
        pending = []
        for trial in self.trials:
            data = finished_results(trial, self.out)
            if data is None:
                pending.append(trial)
                continue
            self.entries[(trial.point.name, trial.order_seed)] = trial_row(trial, data, self.out)
            self.references = self.references or data.get("reference") or None
        return pending

    @property
    def finished(self) -> int:
        return sum(1 for e in self.entries.values() if e["acc"] is not None)

    def record(self, outcome: Outcome) -> dict[str, Any]:
        """Write a finished trial's results (or record its error), then the summary and tables; return its row."""
        trial = outcome.trial
        if outcome.results is not None:
            save_results(outcome.results, trial.results_path(self.out))
            data = outcome.results.to_json()
            entry = trial_row(trial, data, self.out)
            self.references = self.references or data.get("reference") or None
        else:
            entry = trial_row(trial, None, self.out, outcome.error)
        self.entries[(trial.point.name, trial.order_seed)] = entry
        self.write()
        return entry

    def summary(self) -> dict[str, Any]:
        """summary.json's content: rows in plan order, each row's runs in seed order (trials not reached left out)."""
        runs: dict[str, list[dict[str, Any]]] = {row.name: [] for row in self.rows}
        for trial in self.trials:
            entry = self.entries.get((trial.point.name, trial.order_seed))
            if entry is not None:
                runs[trial.point.name].append(entry)
        return summarise(self.config, self.rows, runs)

    def write(self) -> list[Path]:
        """summary.json, table.md and table.csv, each replaced atomically."""
        summary = self.summary()
        label, rows = table(summary, self.references)
        texts = {
            SUMMARY: json.dumps(summary, indent=1) + "\n",
            TABLE_MARKDOWN: markdown_table(label, rows),
            TABLE_CSV: csv_table(label, rows),
        }
        written = []
        for name, text in texts.items():
            path = self.out / name
            write_atomic(path, lambda temporary, text=text: temporary.write_text(text))
            written.append(path)
        return written

    def progress(self, outcome: Outcome, done: int, total: int) -> str:
        """One line per finished trial: its numbers, and its row's running mean over the orders so far."""
        trial = outcome.trial
        head = f"[{done}/{total}] {trial.point.name} seed {trial.order_seed}"
        if outcome.results is None:
            return f"{head} failed: {outcome.error}"
        own = outcome.results.methods[trial.point.method]
        row = self.summary()["methods"][trial.point.name]
        count = sum(1 for r in row["runs"] if r["acc"] is not None)
        return (
            f"{head}: ACC {_pct(own.acc)} BWT {_pct(own.bwt, signed=True)} ({outcome.seconds:.1f} s); "
            f"{trial.point.name} over {count} order{'s' if count != 1 else ''}: "
            f"ACC {_pct(row['acc_mean'])} ± {_pct(row['acc_std'])} "
            f"BWT {_pct(row['bwt_mean'], signed=True)} ± {_pct(row['bwt_std'])}"
        )


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
