"""The mini benchmark's diagnostics (scripts/minibench/diagnose.py) on inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.minibench.diagnose import decay_share, linear_probe, normalised, scaled, width_share, width_share_by_type


def test_normalised_accuracy_is_zero_at_zero_shot_and_one_at_the_fine_tune():
    assert normalised(0.5, 0.5, 0.9) == 0 and normalised(0.9, 0.5, 0.9) == 1
    assert normalised(0.7, 0.5, 0.9) == pytest.approx(0.5) and math.isnan(normalised(0.7, 0.5, 0.5))


def test_scaled_moves_along_the_task_vector():
    pre, tuned = {"w": torch.zeros(2)}, {"w": torch.tensor([2.0, -4.0])}
    assert torch.equal(scaled(pre, tuned, 0.25)["w"], torch.tensor([0.5, -1.0]))


def test_decay_share_is_one_for_pure_shrinkage_and_zero_for_an_orthogonal_update():
    generator = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(6, 4, generator=generator), "b": torch.randn(3, 3, generator=generator)}
    shrunk = {k: 0.98 * v for k, v in pre.items()}
    assert decay_share(pre, shrunk, pre) == pytest.approx(1.0)
    grown = {k: 1.02 * v for k, v in pre.items()}
    assert decay_share(pre, grown, pre) == pytest.approx(-1.0)
    flat = torch.cat([v.flatten() for v in pre.values()])
    other = torch.randn(flat.numel(), generator=generator)
    other -= (other @ flat) / (flat @ flat) * flat  # orthogonal to θ0
    pieces = dict(zip(pre, torch.split(other, [v.numel() for v in pre.values()]), strict=True))
    moved = {k: v + pieces[k].view_as(v) for k, v in pre.items()}
    assert decay_share(pre, moved, pre) == pytest.approx(0.0, abs=1e-6)


def test_width_share_counts_the_directions_that_hold_the_energy():
    u = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))[0]
    rank_one = torch.outer(u[:, 0], u[:, 1])
    assert width_share(rank_one) == pytest.approx(1 / 16)
    assert width_share(torch.eye(16)) == 1.0  # a flat spectrum needs every direction
    two = u[:, :2] @ torch.diag(torch.tensor([3.0, 1.0])) @ u[:, 2:4].T  # energies 9 and 1: 90 % in one
    assert width_share(two) == pytest.approx(2 / 16) and width_share(two, energy=0.9) == pytest.approx(1 / 16)
    assert width_share(torch.zeros(4, 8)) == 0.0 and width_share(torch.eye(4, 8)) == 1.0


def test_width_share_by_type_averages_over_tasks_per_type():
    pre = {"x.weight": torch.zeros(8, 8)}

    def views(key, tensor):
        return [("x.q", tensor[:4]), ("x.k", tensor[4:])]

    low = torch.zeros(8, 8)
    low[0, 0] = 1.0  # a rank-one change in the q half only
    full = torch.cat([torch.eye(4, 8), torch.eye(4, 8)])
    shares = width_share_by_type(pre, [{"x.weight": low}, {"x.weight": full}], views, lambda label: label[-1])
    assert shares == {"q": pytest.approx((1 / 4 + 1) / 2), "k": pytest.approx((0 + 1) / 2)}


def test_linear_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    features = rng.normal(size=(200, 5)) + 4 * labels[:, None]
    assert linear_probe((features[:100], labels[:100]), (features[100:], labels[100:])) == 1.0
    noise = rng.normal(size=(400, 5))
    labels = rng.integers(0, 2, 400)
    assert linear_probe((noise[:200], labels[:200]), (noise[200:], labels[200:])) < 0.7


def test_opcm_projection_removes_nothing_of_orthogonal_tasks_and_reports_sqrt_t():
    """Task vectors living in disjoint rows and columns: OPCM's projection has nothing to remove
    and λ(t) = √t, the regime the diagnostics recognise as 'OPCM acts as task arithmetic'."""
    from scripts.minibench.diagnose import opcm_projection

    pre = {"layers.0.weight": torch.zeros(8, 8), "layers.0.bias": torch.zeros(8)}
    tuned = []
    for t in range(3):
        weight = torch.zeros(8, 8)
        weight[2 * t, 2 * t + 1] = 1.0
        tuned.append({"layers.0.weight": weight, "layers.0.bias": torch.zeros(8)})
    result = opcm_projection(pre, tuned)
    assert result["removed_share"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert result["lambda"] == pytest.approx([1.0, math.sqrt(2), math.sqrt(3)], rel=1e-5)
    shared = [
        {"layers.0.weight": torch.eye(8) + (t + 1) * 0.1 * torch.ones(8, 8), "layers.0.bias": torch.zeros(8)}
        for t in range(2)
    ]
    assert opcm_projection(pre, shared)["removed_share"][1] > 0.1  # a shared leading direction is removed
