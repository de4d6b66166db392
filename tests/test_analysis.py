"""Cosine similarities and spectra, computed without holding all task vectors at once."""

from __future__ import annotations

import pytest
import torch

from merging.analysis import cosine_similarity_matrix, cumulative_share, singular_values
from merging.families.clip_vit.matrices import get_matrix, matrix_labels
from merging.io.checkpoints import open_encoder

from .encoders import TINY, finetuned, random_encoder, write_hf


def flat(state, keys):
    return torch.cat([state[k].double().reshape(-1) for k in keys])


def test_cosine_matrix_matches_direct_computation_through_lazy_readers(tmp_path):
    pretrained = random_encoder(TINY)
    models = [{k: v for k, v in finetuned(pretrained, s).items() if k != "proj"} for s in (1, 2, 3)]
    readers = [open_encoder(write_hf(m, tmp_path / f"m{i}")) for i, m in enumerate(models)]
    merged = {k: (models[0][k] + models[1][k]) / 2 for k in models[0]}
    similarity = cosine_similarity_matrix([*readers, merged], pretrained)
    keys = list(models[0])
    vectors = [flat(m, keys) - flat(pretrained, keys) for m in [*models, merged]]
    for i, a in enumerate(vectors):
        for j, b in enumerate(vectors):
            expected = float(a @ b / (a.norm() * b.norm()))
            assert abs(float(similarity[i, j]) - expected) < 1e-9
    # random low-rank task vectors are nearly orthogonal; the average leans on both parents
    assert abs(float(similarity[0, 2])) < 0.2 and float(similarity[0, 3]) > 0.6


def test_cosine_of_one_layer():
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, s) for s in (1, 2)]
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    similarity = cosine_similarity_matrix(models, pretrained, keys=[key])
    a, b = (m[key] - pretrained[key] for m in models)
    assert abs(float(similarity[0, 1]) - float((a * b).sum() / (a.norm() * b.norm()))) < 1e-6


def test_singular_values_of_matrices_and_qkv_slices():
    pretrained = random_encoder(TINY)
    model = finetuned(pretrained, 1)
    labels = matrix_labels(pretrained)
    assert len(labels) == TINY.layers * 6 and labels[0].endswith("in_proj_weight[q]")
    for label in labels:
        s = singular_values(model, label, pretrained)
        expected = torch.linalg.svdvals((get_matrix(model, label) - get_matrix(pretrained, label)).double())
        torch.testing.assert_close(s, expected)
    s = singular_values(model, labels[1], pretrained)
    share = cumulative_share(s)
    assert float(share[-1]) == 1.0 and bool((share[1:] >= share[:-1]).all())
    assert get_matrix(pretrained, labels[1]).shape == (TINY.width, TINY.width)


# ---------------------------------------------------------------- the live analysis


def test_sketched_cosines_stay_within_0_01_on_realistic_task_vectors():
    """The documented bound, checked on every pair of twelve task vectors of 3.4 M entries
    (ViT-B/32's MLP and square shapes, low-rank structure plus dense noise, cosines from −0.98
    to 1) with a fixed seed; the bound does not depend on the length once it exceeds the sketch's
    (6.5 times here). A sketch of 2¹² buckets, whose error is 11 times larger, misses it (so this
    test can fail)."""
    from merging.experiment.live_analysis import SKETCH_DIMENSION, CountSketch, cosine_error_bound

    g = torch.Generator().manual_seed(7)
    shapes = {"a": (1024, 1024), "b": (3072, 768), "c": (768,)}
    latent = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(5)]
    for z in latent:  # low-rank parts, as in fine-tuned matrices
        z["a"] += 3 * torch.randn(1024, 2, generator=g) @ torch.randn(2, 1024, generator=g)
    mixing = torch.randn(12, 5, generator=g)
    mixing[:, 0] *= 3  # a shared direction: large positive cosines
    mixing[1] = -mixing[0] + 0.4 * torch.randn(5, generator=g)  # and a large negative one
    vectors = [{k: sum(float(w) * z[k] for w, z in zip(row, latent, strict=True)) for k in shapes} for row in mixing]
    keys = list(shapes)
    flats = torch.stack([flat(v, keys) for v in vectors])
    norms = flats.norm(dim=1)
    exact = (flats @ flats.T) / torch.outer(norms, norms)
    assert flats.shape[1] > 4 * SKETCH_DIMENSION and float(exact.min()) < -0.5 and float(exact.max()) > 0.85

    def worst(dimension: int) -> float:
        sketcher = CountSketch({k: flats.new_empty(shapes[k]).numel() for k in keys}, dimension, seed=0)
        assert not sketcher.exact
        sketches = torch.stack([sketcher.sketch(v) for v in vectors]).double()
        estimate = (sketches @ sketches.T) / torch.outer(norms, norms)
        off_diagonal = ~torch.eye(len(vectors), dtype=torch.bool)
        return float((estimate - exact)[off_diagonal].abs().max())

    assert worst(SKETCH_DIMENSION) <= 0.01
    assert cosine_error_bound() < 0.002 and worst(2**12) > 0.01


def live_run(steps: int, dimension: int, methods=("mean", "sum")):
    """The live analysis over ``steps`` tiny checkpoints, with two stand-in merged models."""
    from merging.experiment.live_analysis import LiveAnalysis
    from merging.families.clip_vit.family import ClipViT

    pretrained = random_encoder(TINY)
    keys = list(pretrained)
    models = [finetuned(pretrained, s) for s in range(1, steps + 1)]
    analysis = LiveAnalysis(dimension=dimension)
    records, held = [], []
    for t in range(1, steps + 1):
        seen = models[:t]
        merged = {
            "mean": {k: pretrained[k] + sum(m[k] - pretrained[k] for m in seen) / t for k in keys},
            "sum": {k: pretrained[k] + sum(m[k] - pretrained[k] for m in seen) for k in keys},
        }
        merged = {m: merged[m] for m in methods}
        records.append(analysis.observe(t, f"task{t}", models[t - 1], pretrained, merged, keys, ClipViT()))
        held.append(analysis.held_tensors())
    return pretrained, models, records, held, analysis


def test_live_analysis_is_exact_when_the_encoder_fits_and_matches_the_full_analysis():
    from merging.experiment.live_analysis import cosine_table

    pretrained, models, records, _, analysis = live_run(4, dimension=2**22)
    assert analysis.sketcher.exact and all(r.exact for r in records)
    last = records[-1]
    mean = {k: pretrained[k] + sum(m[k] - pretrained[k] for m in models) / 4 for k in pretrained}
    total = {k: pretrained[k] + sum(m[k] - pretrained[k] for m in models) for k in pretrained}
    expected = cosine_similarity_matrix([*models, mean, total], pretrained)
    table = cosine_table(records)
    assert table.names == [f"τ{t} task{t}" for t in range(1, 5)] + ["merged mean", "merged sum"]
    assert not table.sketched
    torch.testing.assert_close(torch.tensor(table.values, dtype=torch.float64), expected, atol=1e-5, rtol=0)
    # the chosen layer's spectra: τ_t's and each merged delta's, exact
    label = last.layer
    assert label == "transformer.resblocks.1.mlp.c_fc.weight" and last.layer_name == "block 1 · mlp.c_fc"
    tau = get_matrix(models[-1], label).double() - get_matrix(pretrained, label).double()
    assert last.task_spectrum == pytest.approx(torch.linalg.svdvals(tau).tolist(), rel=1e-5)
    delta = get_matrix(mean, label).double() - get_matrix(pretrained, label).double()
    assert last.merged_spectra["mean"] == pytest.approx(torch.linalg.svdvals(delta).tolist(), rel=1e-5)
    assert last.task_norm == pytest.approx(
        float(flat(models[-1], list(pretrained)).sub(flat(pretrained, list(pretrained))).norm())
    )


def test_live_analysis_keeps_only_one_sketch_per_task_and_sketches_match_exact_cosines():
    """Nothing but one k-float sketch per earlier task is held between steps, however many steps."""
    from merging.experiment.live_analysis import cosine_table

    pretrained, models, records, held, analysis = live_run(6, dimension=2**14)
    assert not analysis.sketcher.exact and analysis.sketcher.total > 2**14
    assert [len(h) for h in held] == [1, 2, 3, 4, 5, 6]
    assert all(t.numel() == 2**14 and t.dtype == torch.float32 for h in held for t in h)
    # the rest of the state is two numbers per task (norm) and the sketcher (no tensors)
    assert len(analysis.task_norms) == 6 and all(isinstance(n, float) for n in analysis.task_norms)
    assert not [v for v in vars(analysis.sketcher).values() if isinstance(v, torch.Tensor)]
    expected = cosine_similarity_matrix([*models], pretrained)
    table = cosine_table(records)
    assert table.sketched
    got = torch.tensor(table.values, dtype=torch.float64)[:6, :6]
    # 2^14 buckets: error standard deviation at most √(2/k) ≈ 0.011; the τ·τ entries stay within 5 of those
    assert float((got - expected).abs().max()) < 0.055
    # the new task vector against the merged deltas is exact, sketch or not
    mean = {k: pretrained[k] + sum(m[k] - pretrained[k] for m in models) / 6 for k in pretrained}
    exact_row = cosine_similarity_matrix([models[-1], mean], pretrained)
    assert records[-1].merged_cosines["mean"][-1] == pytest.approx(float(exact_row[0, 1]), abs=1e-6)


def test_layer_choices_are_grouped_by_block_and_type_and_checked():
    from merging.errors import MergingError
    from merging.experiment.live_analysis import check_layer, layer_choices
    from merging.families.clip_vit.family import ClipViT

    family = ClipViT()
    pretrained = random_encoder(TINY)
    choices = layer_choices(family.matrix_labels(pretrained), family.matrix_type)
    names = [name for name, _ in choices]
    assert names[:7] == [
        "block 0 · attn.q",
        "block 0 · attn.k",
        "block 0 · attn.v",
        "block 0 · attn.out",
        "block 0 · mlp.c_fc",
        "block 0 · mlp.c_proj",
        "block 1 · attn.q",
    ]
    assert choices[4][1] == "transformer.resblocks.0.mlp.c_fc.weight" and len(choices) == 12
    labels = [label for _, label in choices]
    default = family.default_spectrum_label(pretrained)
    assert check_layer(None, labels, default) == check_layer("", labels, default) == default
    assert check_layer(labels[0], labels, default) == labels[0]
    for bad in ("transformer.resblocks.7.mlp.c_fc.weight", "conv1.weight", 3):
        with pytest.raises(MergingError, match=f"no matrix {bad!r} in this encoder"):
            check_layer(bad, labels, default)


def test_live_analysis_on_several_threads_gives_the_same_numbers():
    """The parameters are split into groups, one per thread of the run's share; the groups add up."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        *_, one, _, _ = live_run(3, dimension=2**14)
        torch.set_num_threads(3)
        *_, three, _, _ = live_run(3, dimension=2**14)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three, strict=True):
        assert b.task_cosines == pytest.approx(a.task_cosines, abs=1e-6)
        assert b.merged_cosines["mean"] == pytest.approx(a.merged_cosines["mean"], abs=1e-6)
        assert b.merged_spectra["sum"] == pytest.approx(a.merged_spectra["sum"], rel=1e-9)
        assert b.task_norm == pytest.approx(a.task_norm, rel=1e-9)
