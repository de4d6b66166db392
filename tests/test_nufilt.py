"""NUFILT against docs/methods/nufilt.md: the filter, the closed form, the adapter's surrogate and fit,
determinism, bounded state, bad input, and a run on tiny encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.errors import CheckpointError, OptionError
from merging.families.clip_vit.matrices import matrix_labels, matrix_views
from merging.methods import METHODS, create_merger
from merging.methods.nufilt import filtered_label, nufilt_matrix, top_right_singular

from .encoders import TINY, finetuned, random_encoder

SMALL = {"null_rank": 8, "lora_rank": 4, "grad_rank": 2}  # TINY is 32 wide: ViT-B/32's ranks scaled down


def numpy_top_right(matrix: torch.Tensor, k: int) -> np.ndarray:
    """Δ's top-k right-singular vectors from numpy's float64 SVD (independent of the code under test)."""
    _, _, vh = np.linalg.svd(matrix.double().numpy(), full_matrices=False)
    return vh[:k].T


def low_rank_plus_noise(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) + 0.05 * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("shape", [(40, 40), (60, 24), (24, 60)])
def test_filter_removes_exactly_the_top_k_right_singular_component(shape):
    m, n = shape
    delta = low_rank_plus_noise(m, n, 6, seed=1)
    task = low_rank_plus_noise(m, n, 3, seed=2)
    k = 5
    result = nufilt_matrix(task, delta, null_rank=k, grad_rank=2, lora_rank=4, steps=10, lr=1e-3, fit=False)
    v = numpy_top_right(delta, k)
    expected = task.double().numpy() @ (np.eye(n) - v @ v.T)
    np.testing.assert_allclose(result.update.double().numpy(), expected, atol=1e-5)
    assert np.abs(result.update.double().numpy() @ v).max() < 1e-5  # nothing left in the protected subspace
    removed = task.double().numpy() @ v
    assert result.removed_sq == pytest.approx(float((removed**2).sum()), rel=1e-4)
    assert result.null_rank == k and result.loss_end is None


def test_subspace_svd_takes_lapack_columns_and_nonzero_only_real_directions():
    zero = torch.zeros(12, 8)
    # the authors' slice of a zero update's SVD: LAPACK's completion, the first input coordinates here
    torch.testing.assert_close(top_right_singular(zero, 3, "svd"), torch.eye(8)[:, :3])
    assert top_right_singular(zero, 3, "nonzero").shape == (8, 0)
    rank2 = torch.randn(12, 2, generator=torch.Generator().manual_seed(4)) @ torch.randn(
        2, 8, generator=torch.Generator().manual_seed(5)
    )
    assert top_right_singular(rank2, 5, "svd").shape == (8, 5)
    assert top_right_singular(rank2, 5, "nonzero").shape == (8, 2)
    assert top_right_singular(rank2, 50, "svd").shape == (8, 8)  # k is capped at min(m, n), as the slice


def code_surrogate(task, delta, v_null, v_task, b, a, null_space=True):
    """FilterLoRA.solve_lora's two terms written out: ‖(τ − M) V_τ‖² + ‖(Δ − M) V_k‖², M = Δ + τ (P + B A)."""
    n = task.shape[1]
    p = torch.eye(n, dtype=torch.float64) - v_null @ v_null.T if null_space else torch.eye(n, dtype=torch.float64)
    merged = delta + task @ (p + b @ a)
    return float(((task - merged) @ v_task).pow(2).sum() + ((delta - merged) @ v_null).pow(2).sum())


def test_adapter_fit_lowers_the_authors_surrogate():
    m, n = 48, 32
    delta = low_rank_plus_noise(m, n, 6, seed=1)
    task = low_rank_plus_noise(m, n, 4, seed=2)
    generator = torch.Generator().manual_seed(0)
    result = nufilt_matrix(task, delta, null_rank=6, grad_rank=3, lora_rank=4, steps=50, lr=1e-2, generator=generator)
    assert result.loss_start is not None and result.loss_end is not None
    assert result.loss_end < 0.7 * result.loss_start
    # The reported numbers are the code's loss: at B = 0 it needs no adapter, after the fit it is
    # the code's formula evaluated on the update actually applied.
    v_null = torch.from_numpy(numpy_top_right(delta, 6))
    v_task = torch.from_numpy(numpy_top_right(task, 3))
    t64, d64 = task.double(), delta.double()
    zeros = torch.zeros(n, 1, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    assert result.loss_start == pytest.approx(code_surrogate(t64, d64, v_null, v_task, *zeros), rel=1e-4)
    merged = d64 + result.update.double()
    after = float(((t64 - merged) @ v_task).pow(2).sum() + ((d64 - merged) @ v_null).pow(2).sum())
    assert result.loss_end == pytest.approx(after, rel=1e-3)
    # and the fitted update differs from the closed form only by a rank ≤ 4 term
    closed = nufilt_matrix(task, delta, null_rank=6, grad_rank=3, lora_rank=4, steps=50, lr=1e-2, fit=False)
    assert int(torch.linalg.matrix_rank(result.update - closed.update, rtol=1e-4)) <= 4


def test_the_surrogate_matches_the_code_with_the_null_space_switch_off():
    m, n = 30, 20
    delta = low_rank_plus_noise(m, n, 4, seed=7)
    task = low_rank_plus_noise(m, n, 4, seed=8)
    result = nufilt_matrix(task, delta, null_rank=4, grad_rank=2, lora_rank=3, steps=0, lr=1e-3, null_space=False)
    torch.testing.assert_close(result.update, task)  # P = I and no steps: τ whole
    fitted = nufilt_matrix(task, delta, null_rank=4, grad_rank=2, lora_rank=3, steps=1, lr=1e-3, null_space=False)
    v_null = torch.from_numpy(numpy_top_right(delta, 4))
    v_task = torch.from_numpy(numpy_top_right(task, 2))
    zeros = torch.zeros(n, 1, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    expected = code_surrogate(task.double(), delta.double(), v_null, v_task, *zeros, null_space=False)
    assert fitted.loss_start == pytest.approx(expected, rel=1e-4)


def run(pretrained, models, **options):
    merger = create_merger("nufilt", options)
    merger.start(pretrained)
    results = []
    for model in models:
        result = merger.step(model)
        results.append(({k: v.clone() for k, v in result.merged.items()}, result.diagnostics))
    return merger, results


@pytest.mark.parametrize("off", [{"steps": 0}, {"lora_rank": 0}])
def test_without_adapter_each_step_is_the_closed_form(off):
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, seed) for seed in range(1, 4)]
    _, results = run(pretrained, models, **{**SMALL, **off})
    previous = pretrained
    for model, (merged, diagnostics) in zip(models, results, strict=True):
        assert diagnostics["fit_loss"] is None and diagnostics["adapter_share"] == 0.0
        for key in pretrained:
            views = [
                (label, view) for label, view in matrix_views(key, merged[key]) if filtered_label(label, "attn_fc1")
            ]
            if not views:
                torch.testing.assert_close(merged[key], pretrained[key], rtol=0, atol=0)  # untouched, as in the code
                continue
            task = dict(matrix_views(key, model[key] - pretrained[key]))
            delta = dict(matrix_views(key, previous[key] - pretrained[key]))
            before = dict(matrix_views(key, previous[key]))
            for label, view in views:
                v = torch.from_numpy(numpy_top_right(delta[label], SMALL["null_rank"])).float()
                expected = before[label] + task[label] - (task[label] @ v) @ v.T
                torch.testing.assert_close(view, expected, atol=2e-5, rtol=0)
        previous = merged


def test_first_step_svd_filters_the_first_input_coordinates_and_nonzero_nothing():
    pretrained = random_encoder(TINY)
    model = finetuned(pretrained, 1)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    ((merged, d_svd),) = run(pretrained, [model], **SMALL)[1]
    added = merged[key] - pretrained[key]
    task = model[key] - pretrained[key]
    assert float(added[:, : SMALL["null_rank"]].abs().max()) == 0.0  # V of a zero matrix is I: first k columns go
    torch.testing.assert_close(added[:, SMALL["null_rank"] :], task[:, SMALL["null_rank"] :], atol=1e-6, rtol=0)
    ((merged, d_nonzero),) = run(pretrained, [model], **SMALL, subspace="nonzero")[1]
    torch.testing.assert_close(merged[key], model[key], atol=1e-6, rtol=0)
    assert d_nonzero["filtered_share"] == 0.0 < d_svd["filtered_share"]
    # c_proj (the second MLP layer) is not filtered in the authors' config, only with layers=all
    c_proj = "transformer.resblocks.0.mlp.c_proj.weight"
    assert torch.equal(merged[c_proj], pretrained[c_proj])
    ((merged, _),) = run(pretrained, [model], **SMALL, subspace="nonzero", layers="all")[1]
    torch.testing.assert_close(merged[c_proj], model[c_proj], atol=1e-6, rtol=0)


def test_run_on_tiny_encoders_reports_its_internals_and_is_deterministic():
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, seed) for seed in range(1, 5)]
    _, first = run(pretrained, models, **SMALL)
    _, again = run(pretrained, models, **SMALL)
    _, reseeded = run(pretrained, models, **SMALL, seed=1)
    for (a, _), (b, _) in zip(first, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    key = "transformer.resblocks.1.attn.in_proj_weight"
    assert not torch.equal(first[-1][0][key], reseeded[-1][0][key])  # the adapter's init is the seed's
    assert first[0][1]["fit_loss"] is None  # no fit at the first step, as in the code
    labels = [label for label in matrix_labels(pretrained) if filtered_label(label, "attn_fc1")]
    for merged, diagnostics in first[1:]:
        assert 0.0 < diagnostics["filtered_share"] < 1.0
        assert diagnostics["fit_loss"] < diagnostics["fit_loss_start"]
        assert diagnostics["adapter_share"] > 0.0
        assert set(diagnostics["matrices"]) == set(labels)
        assert all(torch.isfinite(v).all() for v in merged.values())
        untouched = [
            k for k in pretrained if not any(filtered_label(lb, "attn_fc1") for lb, _ in matrix_views(k, pretrained[k]))
        ]
        assert untouched and all(torch.equal(merged[k], pretrained[k]) for k in untouched)
    assert METHODS["nufilt"].step_summary(first[-1][1])[0].startswith("filtered=")


def test_live_figure_draws_the_share_filtered_and_the_fit():
    from merging.experiment.results import MethodResults, StepRecord

    pretrained = random_encoder(TINY)
    _, steps = run(pretrained, [finetuned(pretrained, seed) for seed in (1, 2)], **SMALL)
    results = MethodResults("nufilt", SMALL, ["a", "b"])
    for _, diagnostics in steps:
        results.steps.append(StepRecord({}, 0.0, 0.0, None, None, diagnostics))
    figure = METHODS["nufilt"].live_figure(results)
    assert [trace.name for trace in figure.data] == ["filtered share", "before fit", "after fit"]
    assert list(figure.data[2].y) == [None, steps[1][1]["fit_loss"]]


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a merger's attributes (dicts, lists, dataclasses)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def test_state_stays_theta0_plus_merged_whatever_the_number_of_steps():
    pretrained = random_encoder(TINY)
    merger = create_merger("nufilt", SMALL)
    merger.start(pretrained)
    size = sum(v.numel() * 4 for v in pretrained.values())
    held = []
    for seed in range(1, 6):
        merger.step(finetuned(pretrained, seed))
        held.append(tensor_bytes(merger))
    assert held == [2 * size] * 5  # θ0 and the merged encoder, nothing per task


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("null_rank", -1),
        ("lora_rank", -3),
        ("grad_rank", -1),
        ("steps", -1),
        ("lr", 0),
        ("lr", -1e-3),
        ("subspace", "paper"),
        ("layers", "mlp"),
        ("seed", -2),
        ("steps", 2.5),
    ],
)
def test_bad_options_raise_naming_the_option(option, value):
    with pytest.raises(OptionError, match=rf"nufilt option {option}="):
        create_merger("nufilt", {option: value})


def test_a_checkpoint_without_linear_layers_is_refused_by_name():
    pretrained = random_encoder(TINY)
    merger = create_merger("nufilt", SMALL)
    merger.start(pretrained)
    no_linear = {k: v + 0.01 for k, v in pretrained.items() if not matrix_views(k, v)}
    with pytest.raises(CheckpointError, match=r"^fine-tuned encoder 1 has no .*linear weights for NUFILT"):
        merger.step(no_linear)
    assert merger.step_count == 0  # refused before anything changed
    only_c_proj = {k: v for k, v in finetuned(pretrained, 1).items() if k.endswith("mlp.c_proj.weight")}
    with pytest.raises(CheckpointError, match="attention or first-MLP"):
        merger.step(only_c_proj)
    merger.step(finetuned(pretrained, 1))  # and still works


def test_a_family_without_attention_has_every_linear_weight_filtered():
    from merging.families.mlp import MLP_FAMILY, MLPArch

    torch.manual_seed(0)
    pretrained = {k: v.detach().clone() for k, v in MLPArch((12, 20, 6)).build().state_dict().items()}
    models = [{k: v + 0.05 * torch.randn_like(v) for k, v in pretrained.items()} for _ in range(3)]
    merger = create_merger("nufilt", {"null_rank": 3, "lora_rank": 2, "grad_rank": 1})
    merger.start(pretrained, family=MLP_FAMILY)
    for model in models:
        result = merger.step(model)
    assert set(result.diagnostics["matrices"]) == {"layers.0.weight", "layers.1.weight"}
    assert result.diagnostics["fit_loss"] < result.diagnostics["fit_loss_start"]
    assert torch.equal(result.merged["layers.0.bias"], pretrained["layers.0.bias"])  # biases stay θ0


def test_registry_lists_nufilt_with_its_published_name():
    assert "nufilt" in METHODS
    cls = METHODS["nufilt"]
    assert cls.published_name == "nufilt" and cls.uses_matrices and not cls.requires_data
    assert {o.name: o.default for o in cls.options}["null_rank"] == 128
