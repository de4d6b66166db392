"""The continual baselines against their definitions in ALGORITHMS.md."""

from __future__ import annotations

import pytest
import torch

from merging.methods import create_merger
from merging.methods.ties import kth_smallest_magnitude, magnitude_threshold

from .encoders import TINY, finetuned, random_encoder


def merge(method, pretrained, models, **options):
    merger = create_merger(method, options)
    merger.start(pretrained)
    result = None
    for model in models:
        result = merger.step(model)
    return {k: v.clone() for k, v in result.merged.items()}, result.diagnostics


@pytest.fixture
def encoders():
    pretrained = random_encoder(TINY)
    return pretrained, [finetuned(pretrained, seed) for seed in range(1, 5)]


def test_task_arithmetic_is_pretrained_plus_scaled_sum_and_order_invariant(encoders):
    pretrained, models = encoders
    merged, diagnostics = merge("task_arithmetic", pretrained, models, scaling=0.3)
    for key in pretrained:
        expected = pretrained[key] + 0.3 * sum(m[key] - pretrained[key] for m in models)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-6)
    reversed_merged, _ = merge("task_arithmetic", pretrained, models[::-1], scaling=0.3)
    for key in pretrained:
        torch.testing.assert_close(merged[key], reversed_merged[key], atol=1e-6, rtol=1e-6)
    assert diagnostics["merged_norm"] > 0 and diagnostics["step"] == 4


def test_weight_average_is_the_mean(encoders):
    pretrained, models = encoders
    merger = create_merger("weight_average")
    merger.start(pretrained)
    for t, model in enumerate(models, start=1):
        merged = merger.step(model).merged
        for key in pretrained:
            torch.testing.assert_close(merged[key], sum(m[key] for m in models[:t]) / t, atol=1e-6, rtol=1e-6)


def test_magmax_keeps_largest_magnitude_and_ties_go_to_the_newer():
    pretrained = {"w": torch.zeros(5)}
    first = {"w": torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])}
    second = {"w": torch.tensor([-1.0, 1.0, -0.7, 3.0, 2.0])}  # entry 0 ties in magnitude, opposite sign
    merged, _ = merge("magmax", pretrained, [first, second], scaling=0.5)
    expected_v = torch.tensor([-1.0, -2.0, -0.7, 3.0, 2.0])
    torch.testing.assert_close(merged["w"], 0.5 * expected_v)


def test_ties_hand_computed_example():
    # Two keys, so trimming must be global over the flattened encoder. d = 10, top 20%: k = 2, and
    # like the reference each vector keeps the entries ≥ its (d − k)-th smallest magnitude (here 3).
    pretrained = {"a": torch.zeros(6), "b": torch.zeros(4)}
    tau1 = {"a": torch.tensor([5.0, -4.0, 1.0, 0.5, 0.0, 0.0]), "b": torch.tensor([0.0, 0.0, 0.0, 0.1])}
    tau2 = {"a": torch.tensor([-6.0, 3.0, 2.0, 0.0, 0.0, 0.0]), "b": torch.tensor([0.0, 0.0, 0.0, 0.2])}
    merged, _ = merge("ties", pretrained, [tau1, tau2], scaling=1.0, top_k=20)
    # step 1: θ = τ1. step 2: trimmed m = [5, -4, 1, 0...], trimmed τ2 = [-6, 3, 2, 0...];
    # sums [-1, -1, 3, 0...] elect signs [-, -, +], and zero sums the majority sign (-);
    # the agreeing values add up to [-6, -4, 1 + 2, 0...]
    torch.testing.assert_close(merged["a"], torch.tensor([-1.0, -8.0, 4.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(merged["b"], torch.tensor([0.0, 0.0, 0.0, 0.1]))


def test_ties_scaling_applies_to_first_step_and_merge(encoders):
    pretrained, models = encoders
    merged, _ = merge("ties", pretrained, models[:1], scaling=0.3)
    for key in pretrained:
        torch.testing.assert_close(merged[key], pretrained[key] + 0.3 * (models[0][key] - pretrained[key]))


def test_magnitude_threshold_matches_reference_kthvalue():
    values = torch.tensor([0.1, -5.0, 3.0, 3.0, -0.2, 0.0, 7.0, 1.0])
    # d = 8, top 25% → k = 2 → the 6th smallest magnitude (3.0); both 3.0 entries are kept too
    assert magnitude_threshold(lambda: [values[:3], values[3:]], 8, 25.0) == 3.0
    assert magnitude_threshold(lambda: [values], 8, 100.0) == 0.0


def test_radix_selection_equals_kthvalue_on_awkward_values():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, generator=g) * 10.0 ** torch.randint(-8, 3, (1000,), generator=g) for _ in range(3)]
    parts.append(torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.0, -3.0, 3.0]))  # zeros, subnormals, ties
    flat = torch.cat(parts).abs()
    for rank in (1, 2, 500, 1500, 2999, flat.numel()):
        assert kth_smallest_magnitude(lambda: parts, rank) == float(torch.kthvalue(flat, rank).values)
