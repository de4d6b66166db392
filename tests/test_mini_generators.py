"""The mini benchmark's generators: deterministic, well-formed, and what the registry says."""

from __future__ import annotations

import numpy as np
import pytest

from merging.evaluation.tasks import registry
from scripts.minibench.build import MINI_8, draw_split
from scripts.minibench.generators import TASKS, digit_split


@pytest.mark.parametrize("spec", TASKS, ids=[t.name for t in TASKS])
def test_draws_are_deterministic_32px_rgb(spec):
    first, labels = draw_split(spec, "task", 12, seed=5)
    again, labels_again = draw_split(spec, "task", 12, seed=5)
    assert np.array_equal(labels, labels_again) and sorted(set(labels)) == sorted(set(labels_again))
    for a, b in zip(first, again, strict=True):
        assert a.size == (32, 32) and a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    other, _ = draw_split(spec, "web", 12, seed=5)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, other, strict=True))


def test_twelve_tasks_with_enough_classes_and_templates():
    assert len(TASKS) == 12 and len({t.name for t in TASKS}) == 12
    assert all(len(t.classnames) >= 4 and len(t.templates) >= 2 for t in TASKS)
    assert sum(len(t.classnames) >= 10 for t in TASKS) > len(TASKS) / 2
    assert set(MINI_8) <= {t.name for t in TASKS}


def test_digit_splits_are_disjoint_real_images():
    test, train = digit_split(500, seed=0)
    assert len(test) == 500 and len(np.intersect1d(test, train)) == 0 and len(test) + len(train) == 1797


def test_registry_matches_the_generators():
    tasks = registry()
    assert tasks.sets["mini-8"] == MINI_8 and len(tasks.sets["mini-12"]) == 12
    for spec in TASKS:
        task = tasks.get(spec.name)
        assert task.classnames == spec.classnames and task.templates == spec.templates
        assert task.dataset.is_local and task.checkpoint_path.is_dir()
