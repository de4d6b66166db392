"""The mini benchmark's generators: deterministic, well-formed, and what the registry says."""

from __future__ import annotations

import numpy as np
import pytest

from merging.evaluation.tasks import registry
from scripts.minibench.build import MINI_8, TASK_STYLE_IN_PRETRAINING, draw_split, jpeg
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


def test_low_resolution_tasks_ship_upscaled_images_and_the_web_corpus_does_not():
    """acquire() averages down to the task's capture size and upscales back: the result has at most
    native² degrees of freedom, so its fine detail is gone; full-resolution tasks pass unchanged."""
    from PIL import Image

    from scripts.minibench.generators import SIZE, acquire

    rng = np.random.default_rng(0)
    sharp = Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8))
    assert acquire(sharp, SIZE) is sharp
    blurred = np.asarray(acquire(sharp, 16), dtype=np.float32)
    assert blurred.shape == (SIZE, SIZE, 3)
    # Neighbouring pixels of the upscaled image are far closer than those of white noise.
    assert np.abs(np.diff(blurred, axis=0)).mean() < 0.6 * np.abs(np.diff(np.asarray(sharp, np.float32), axis=0)).mean()
    low = [spec for spec in TASKS if spec.native < SIZE]
    assert {spec.mirrors for spec in low} == {"mnist", "svhn", "emnist_letters", "gtsrb", "eurosat"}
    spec = low[0]
    # draw_split's task images are exactly the drawings captured at the task's resolution (then
    # stored as JPEG); the web corpus's are the drawings themselves, even in the task's style.
    rng = np.random.default_rng(3)
    labels = np.arange(4) % len(spec.classnames)
    rng.shuffle(labels)
    expected = [jpeg_round_trip(acquire(spec.draw(rng, int(label), "task"), spec.native)) for label in labels]
    task, _ = draw_split(spec, "task", 4, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(task, expected, strict=True))
    rng = np.random.default_rng(3)
    labels = np.arange(4) % len(spec.classnames)
    rng.shuffle(labels)
    expected = []
    for label in labels:
        style = "task" if rng.random() < TASK_STYLE_IN_PRETRAINING else "web"
        expected.append(jpeg_round_trip(spec.draw(rng, int(label), style)))
    web, _ = draw_split(spec, "web", 4, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(web, expected, strict=True))


def jpeg_round_trip(image):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(jpeg(image))).convert("RGB")


def test_counting_objects_never_overlap_and_every_count_is_drawn():
    from scripts.minibench.generators import COUNTS, draw_count

    rng = np.random.default_rng(1)
    for label in range(len(COUNTS)):
        for domain in ("task", "web"):
            image = draw_count(rng, label, domain)
            assert image.size == (32, 32)
    # Random sequential placement can jam (no room left for the last objects): the build once hung
    # there on the 10,000th draw. A jammed layout starts over, so many draws of five always finish.
    for _ in range(1500):
        draw_count(rng, len(COUNTS) - 1, "task")
