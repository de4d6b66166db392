"""ACC and BWT over an accuracy matrix, against hand computation."""

from __future__ import annotations

import pytest

from merging.experiment.metrics import acc, average_seen_accuracy, bwt, bwt_per_step

# a[i][t]: task i after step t; None where a task was not yet evaluated.
MATRIX = [
    [0.90, 0.80, 0.70],
    [None, 0.60, 0.50],
    [None, None, 0.40],
]


def test_acc_is_mean_over_tasks_of_final_model():
    assert acc(MATRIX) == pytest.approx((0.70 + 0.50 + 0.40) / 3)


def test_bwt_divides_by_t_minus_one_and_uses_merged_diagonal():
    # ((0.70 − 0.90) + (0.50 − 0.60)) / 2, not / 3
    assert bwt(MATRIX) == pytest.approx(-0.15)


def test_per_step_curves():
    assert average_seen_accuracy(MATRIX) == pytest.approx([0.90, 0.70, (0.70 + 0.50 + 0.40) / 3])
    per_step = bwt_per_step(MATRIX)
    assert per_step[0] is None
    assert per_step[1:] == pytest.approx([-0.10, -0.15])


def test_missing_seen_entry_is_an_error():
    with pytest.raises(ValueError, match="task 1 after step 2 is missing"):
        acc([[0.9, 0.8, 0.7], [None, 0.6, None], [None, None, 0.4]])
