"""Continual-learning metrics over an accuracy matrix, exactly as the literature defines them.

``a[i][t]`` is the accuracy on task i (in merge order) of the merged model after step t,
both 0-based here. Entries not evaluated are None (or NaN); a step's column must hold at
least the seen tasks i ≤ t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _entry(a: Matrix, i: int, t: int) -> float:
    value = a[i][t]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"accuracy of task {i} after step {t} is missing")
    return float(value)


def _steps(a: Matrix) -> int:
    if not a:
        raise ValueError("empty accuracy matrix")
    return len(a[0])


def acc(a: Matrix, step: int | None = None) -> float:
    """ACC: mean accuracy of the model after ``step`` (default: the last) on tasks 0..step."""
    t = _steps(a) - 1 if step is None else step
    return sum(_entry(a, i, t) for i in range(t + 1)) / (t + 1)


def bwt(a: Matrix, step: int | None = None) -> float | None:
    """BWT after ``step``: 1/t · Σ_{i<t} (a[i][t] − a[i][i]); None after the first step.

    a[i][i] is the merged model right after task i entered, not the fine-tuned model, and
    the divisor is the number of earlier tasks (T − 1), not T.
    """
    t = _steps(a) - 1 if step is None else step
    if t == 0:
        return None
    return sum(_entry(a, i, t) - _entry(a, i, i) for i in range(t)) / t


def average_seen_accuracy(a: Matrix) -> list[float]:
    """Per step t, the mean accuracy over the tasks seen so far (ACC as the run goes)."""
    return [acc(a, t) for t in range(_steps(a))]


def bwt_per_step(a: Matrix) -> list[float | None]:
    """Per step t, BWT over the tasks seen so far (None at the first step)."""
    return [bwt(a, t) for t in range(_steps(a))]
