"""Cosine similarities and spectra, computed without holding all task vectors at once."""

from __future__ import annotations

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
