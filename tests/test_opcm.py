"""OPCM against ALGORITHMS.md: its invariants, its options, and the reference formulation."""

from __future__ import annotations

import math

import pytest
import torch

from merging.families.clip_vit.matrices import matrix_labels, matrix_views
from merging.io.state_dict import distance
from merging.methods import create_merger
from merging.methods import opcm as opcm_module
from merging.methods.opcm import eigen_bases, project_task_matrix, reduced_svd, split_rank

from .encoders import TINY, VisionArch, finetuned, random_encoder, task_vector

WIDE = VisionArch(width=64, layers=2, heads=2, mlp_width=128, patch_size=8, image_size=16, output_dim=16)


def reference_projection(merged_delta, task_delta, alpha, projection="block", zero_diagonal=True):
    """The reference code's formulation, in float64: full SVD bases, U (Uᵀ Δ V) Vᵀ."""
    u, s, vh = torch.linalg.svd(merged_delta.double(), full_matrices=True)
    v = vh.T
    split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    p = u.T @ task_delta.double() @ v
    if zero_diagonal:
        p.diagonal().fill_(0)
    if projection == "block":
        p[:split, :split] = 0
    else:
        p[:split, :] = 0
        p[:, :split] = 0
    return u @ p @ v.T, split


@pytest.mark.parametrize("shape", [(48, 48), (60, 40), (40, 60), (96, 32), (32, 96)])
@pytest.mark.parametrize("projection", ["block", "two_sided"])
@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_projection_equals_reference_formulation(shape, projection, zero_diagonal):
    g = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    merged = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) + 0.1 * torch.randn(m, n, generator=g)
    task = torch.randn(m, n, generator=g)
    expected, expected_split = reference_projection(merged, task, 0.5, projection, zero_diagonal)
    got, split = project_task_matrix(merged, task, 0.5, projection, zero_diagonal)
    assert split == expected_split > 0
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    in_place = task.clone()
    project_task_matrix(merged, in_place, 0.5, projection, zero_diagonal, out=in_place)
    torch.testing.assert_close(in_place, got, atol=1e-6, rtol=0)


def test_rank_deficient_and_zero_matrices_follow_the_reference():
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    task = torch.randn(40, 30, generator=g)
    for merged in (low_rank, torch.zeros(40, 30)):
        got, split = project_task_matrix(merged, task, 0.5)
        # Null-space directions are arbitrary in both; what is defined is the orthogonality.
        assert abs(float((got * merged).sum())) < 1e-4
        assert split == reference_projection(merged, task, 0.5)[1]


def test_split_rank_counts_leading_values_up_to_alpha():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert [split_rank(s, a) for a in (0.0, 0.39, 0.4, 0.5, 0.7, 0.95, 1.0)] == [0, 0, 1, 1, 2, 3, 0]
    assert split_rank(torch.zeros(3), 0.5) == 0


def test_projected_update_is_orthogonal_to_merged_delta():
    g = torch.Generator().manual_seed(1)
    merged = torch.randn(64, 48, generator=g)
    task = torch.randn(64, 48, generator=g) + merged  # strongly aligned on purpose
    projected, _ = project_task_matrix(merged, task, 0.5)
    assert abs(float((projected * merged).sum())) < 1e-4 * float(task.norm() * merged.norm())
    unprojected, _ = project_task_matrix(merged, task, 0.5, zero_diagonal=False)
    assert abs(float((unprojected * merged).sum())) > 1.0


def test_alpha_one_removes_no_block():
    g = torch.Generator().manual_seed(2)
    merged = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g) + 0.1 * torch.randn(30, 20, generator=g)
    task = torch.randn(30, 20, generator=g)
    projected, split = project_task_matrix(merged, task, 1.0)
    assert split == 0
    u, _, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    p = u.T @ projected.double() @ vh.T
    original = u.T @ task.double() @ vh.T
    off_diagonal = ~torch.eye(30, 20, dtype=torch.bool)
    torch.testing.assert_close(p[off_diagonal], original[off_diagonal], atol=1e-5, rtol=0)
    assert float(p.diagonal().abs().max()) < 1e-5


def test_block_and_two_sided_zero_what_they_say():
    g = torch.Generator().manual_seed(3)
    merged = torch.randn(40, 4, generator=g) @ torch.randn(4, 30, generator=g) + 0.05 * torch.randn(40, 30, generator=g)
    task = torch.randn(40, 30, generator=g)
    u, _, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    original = u.T @ task.double() @ vh.T
    coefficients = {}
    for projection in ("block", "two_sided"):
        projected, split = project_task_matrix(merged, task, 0.8, projection)
        coefficients[projection] = u.T @ projected.double() @ vh.T
    assert split >= 2
    block, two_sided = coefficients["block"], coefficients["two_sided"]
    assert float(block[:split, :split].abs().max()) < 1e-5
    assert float(two_sided[:split, :].abs().max()) < 1e-5 and float(two_sided[:, :split].abs().max()) < 1e-5
    # block keeps the rows and columns beyond the leading block that two_sided removes
    torch.testing.assert_close(block[:split, split:], original[:split, split:], atol=1e-5, rtol=0)
    torch.testing.assert_close(block[split:, :split], original[split:, :split], atol=1e-5, rtol=0)


def run_opcm(pretrained, models, **options):
    merger = create_merger("opcm", options)
    merger.start(pretrained)
    results = []
    for model in models:
        result = merger.step(model)
        results.append(({k: v.clone() for k, v in result.merged.items()}, result.diagnostics))
    return results


def test_merged_norm_is_running_mean_of_task_norms():
    pretrained = random_encoder(WIDE)
    models = [finetuned(pretrained, seed) for seed in range(1, 6)]
    norms = [distance(m, pretrained, m.keys()) for m in models]
    for t, (merged, diagnostics) in enumerate(run_opcm(pretrained, models), start=1):
        expected = sum(norms[:t]) / t
        assert distance(merged, pretrained, models[0].keys()) == pytest.approx(expected, rel=1e-5)
        assert diagnostics["mean_task_norm"] == pytest.approx(expected, rel=1e-9)
        assert diagnostics["merged_norm"] == pytest.approx(expected, rel=1e-5)
    first, _ = run_opcm(pretrained, models[:1])[0]
    assert all(torch.equal(first[k], models[0][k]) for k in models[0])  # step 1 takes θ_1 whole


def test_lambda_grows_like_sqrt_t_for_orthogonal_task_vectors():
    pretrained = random_encoder(WIDE)
    # Dense random task vectors of equal norm are nearly orthogonal in this dimension.
    models = [finetuned(pretrained, seed, rank=1, scale=0.0, noise=0.01) for seed in range(1, 9)]
    results = run_opcm(pretrained, models)
    for t, (_, diagnostics) in enumerate(results, start=1):
        assert diagnostics["lambda"] == pytest.approx(math.sqrt(t), rel=0.05)


def test_update_is_orthogonal_to_previous_merged_delta_in_every_matrix():
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, seed) for seed in range(1, 4)]
    merger = create_merger("opcm")
    merger.start(pretrained)
    for step, model in enumerate(models, start=1):
        previous = {k: merger.merged[k] - pretrained[k] for k in merger.merged} if step > 1 else None
        lam_prev = getattr(merger, "lambda_prev", 1.0)
        result = merger.step(model)
        if previous is None:
            continue
        lam = result.diagnostics["lambda"]
        for key, value in result.merged.items():
            # Δ̃ = λ·(new merged delta) − λ_prev·(previous merged delta)
            added = lam * (value - pretrained[key]) - lam_prev * previous[key]
            for (label, added_view), (_, previous_view) in zip(
                matrix_views(key, added), matrix_views(key, previous[key]), strict=True
            ):
                inner = float((added_view.double() * previous_view.double()).sum())
                scale = float(added_view.norm() * previous_view.norm())
                assert abs(inner) < 1e-3 * scale, label
        assert set(result.diagnostics["matrices"]) == set(matrix_labels(pretrained))


def test_frozen_first_keeps_first_class_embedding_up_to_rescaling():
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, seed) for seed in range(1, 5)]
    first_delta = models[0]["class_embedding"] - pretrained["class_embedding"]
    for merged, _ in run_opcm(pretrained, models, class_embedding="frozen_first"):
        delta = merged["class_embedding"] - pretrained["class_embedding"]
        ratio = float(delta @ first_delta / (first_delta @ first_delta))
        torch.testing.assert_close(delta, ratio * first_delta, atol=1e-6, rtol=1e-4)
    merged_default, _ = run_opcm(pretrained, models)[-1]
    delta = merged_default["class_embedding"] - pretrained["class_embedding"]
    cosine = float(delta @ first_delta / (delta.norm() * first_delta.norm()))
    assert cosine < 0.9  # the default merges later class embeddings in


def test_diagnostics_report_projection_internals():
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, seed) for seed in range(1, 4)]
    results = run_opcm(pretrained, models)
    assert results[0][1]["removed_share"] == 0.0 and results[0][1]["lambda"] == 1.0
    _, last = results[-1]
    assert 0.0 < last["removed_share"] < 1.0
    entry = last["matrices"]["transformer.resblocks.0.attn.in_proj_weight[q]"]
    assert entry["split"] >= 1 and 0.0 <= entry["removed_share"] <= 1.0


def test_math_is_float32_whatever_the_storage_dtype():
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, seed) for seed in range(1, 3)]
    half = run_opcm({k: v.half() for k, v in pretrained.items()}, [{k: v.half() for k, v in m.items()} for m in models])
    full = run_opcm(
        {k: v.half().float() for k, v in pretrained.items()},
        [{k: v.half().float() for k, v in m.items()} for m in models],
    )
    for key, value in half[-1][0].items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, full[-1][0][key])


def test_task_vector_helper_is_low_rank_plus_noise():
    pretrained = random_encoder(TINY)
    tau = task_vector(pretrained, seed=1)
    s = torch.linalg.svdvals(tau["transformer.resblocks.0.mlp.c_fc.weight"])
    assert float(s[1] / s[2]) > 3  # two strong directions above the noise floor


# ---------------------------------------------------------------- batched eigendecompositions (the GPU path)


def test_batched_bases_are_the_per_matrix_ones():
    """eigen_bases stacks equal-width Grams into one eigh per stack; V and s are reduced_svd's to float64
    rounding, in the order asked, across several stacks of a width (a small batch size forces them), with
    rank-deficient and empty matrices left to reduced_svd's SVD fallback (None)."""
    g = torch.Generator().manual_seed(5)
    matrices = [
        torch.randn(48, 3, generator=g) @ torch.randn(3, 32, generator=g) + 0.1 * torch.randn(48, 32, generator=g),
        torch.randn(32, 32, generator=g),
        torch.randn(40, 24, generator=g),
        torch.randn(96, 32, generator=g).T.T,  # a transposed view's transpose: not contiguous-made
        torch.randn(40, 2, generator=g) @ torch.randn(2, 32, generator=g),  # rank 2: SVD fallback
        torch.zeros(32, 32),
        torch.randn(64, 32, generator=g)[::2],  # strided rows
    ]
    asked = []
    bases = eigen_bases(
        [tuple(m.shape) for m in matrices], lambda i: asked.append(i) or matrices[i], batch_bytes=2 * 8 * 32 * 32
    )
    assert sorted(asked) == list(range(len(matrices))) and len(asked) == len(matrices)  # each formed once
    for matrix, basis in zip(matrices, bases, strict=True):
        v, s, _ = reduced_svd(matrix)
        if basis is None:
            assert float(s[-1]) <= 1e-6 * float(s[0])
            continue
        torch.testing.assert_close(basis.s, s, rtol=1e-12, atol=0)
        torch.testing.assert_close(basis.v, v, rtol=0, atol=1e-6)
        assert torch.equal(basis.s_host, basis.s.cpu())
    assert bases[4] is None and bases[5] is None and all(bases[i] is not None for i in (0, 1, 2, 3, 6))
    with pytest.raises(ValueError, match="tall"):
        eigen_bases([(3, 4)], lambda i: torch.zeros(3, 4))


@pytest.mark.parametrize(
    "options",
    [{}, {"projection": "two_sided", "zero_diagonal": False}, {"class_embedding": "frozen_first", "alpha": 0.8}],
)
def test_batched_steps_merge_what_per_matrix_steps_merge(monkeypatch, options):
    """The CUDA step (stacked eigendecompositions, norms kept on the device) run on the CPU: the same
    merged weights and diagnostics as the per-matrix step, to float64 rounding of the decompositions."""
    pretrained = random_encoder(WIDE)
    models = [finetuned(pretrained, seed) for seed in range(1, 5)]
    per_matrix = run_opcm(pretrained, models, **options)
    monkeypatch.setattr(opcm_module, "BATCHED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(opcm_module, "EIGH_BATCH_BYTES", 5 * 8 * 64 * 64)  # several stacks per width
    batched = run_opcm(pretrained, models, **options)
    for (merged, diagnostics), (expected, expected_diagnostics) in zip(batched, per_matrix, strict=True):
        for key, value in expected.items():
            torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7)
        assert diagnostics["lambda"] == pytest.approx(expected_diagnostics["lambda"], rel=1e-9)
        assert diagnostics["removed_share"] == pytest.approx(expected_diagnostics["removed_share"], rel=1e-9)
        assert diagnostics["matrices"].keys() == expected_diagnostics["matrices"].keys()
        for label, entry in expected_diagnostics["matrices"].items():
            assert diagnostics["matrices"][label]["split"] == entry["split"]
            assert diagnostics["matrices"][label]["removed_share"] == pytest.approx(entry["removed_share"], abs=1e-9)
