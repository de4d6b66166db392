"""DOP against ALGORITHMS.md and FusionBench 0.2.33's ContinualDOPForCLIP.

The batched implementation is compared with the plain per-matrix formulation
(:mod:`merging.methods._dop_reference`: autograd losses, two backward passes, Adam), and the
whole merger with FusionBench itself when ``fusion_bench`` is importable (a separate
environment with fusion-bench 0.2.33 and transformers < 5; see docs/methods/dop.md).
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from merging.errors import OptionError
from merging.families.clip_vit.layouts import to_canonical
from merging.families.clip_vit.matrices import matrix_views
from merging.methods import create_merger
from merging.methods._dop_reference import min_norm_weights as reference_min_norm
from merging.methods._dop_reference import reference_dop_weight
from merging.methods.dop import DOP, DOPSettings, fit_matrices, min_norm_weights, trace_iterations

from .encoders import TINY, finetuned, random_encoder, write_hf

FIELDS = ("lr", "steps", "mgda", "ema", "ema_beta", "alpha", "svd_epsilon", "proj_space")


def stack_of(shape, count=3, seed=0):
    """θ0, merged and new weights of ``count`` matrices: low-rank task vectors plus noise."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape

    def task_vector():
        low_rank = torch.randn(count, m, 3, generator=g) @ torch.randn(count, 3, n, generator=g)
        return 0.05 * low_rank + 0.005 * torch.randn(count, m, n, generator=g)

    pretrained = torch.randn(count, m, n, generator=g)
    return pretrained, pretrained + task_vector(), pretrained + task_vector()


def relative(got, expected, base):
    return float((got - expected).norm() / (expected - base).norm())


@pytest.mark.parametrize("shape", [(24, 24), (48, 12), (12, 48)])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mgda": False},
        {"ema": False},
        {"proj_space": "u"},
        {"proj_space": "v"},
        {"svd_epsilon": 0.9, "alpha": 0.3},
        {"lr": 1e-2, "ema_beta": 0.9},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_fit_equals_the_plain_formulation(shape, options):
    settings = DOPSettings(**{"steps": 60, **options})
    pretrained, merged, new = stack_of(shape, seed=sum(shape))
    fit = fit_matrices(pretrained, merged, new, settings)
    expected = torch.stack(
        [
            reference_dop_weight(pretrained[i], merged[i], new[i], **{f: getattr(settings, f) for f in FIELDS})
            for i in range(3)
        ]
    )
    start = (merged + new) / 2
    assert relative(fit.weights, expected, start) < 1e-4  # of how far the optimisation moved
    assert relative(fit.weights, expected, pretrained) < 1e-6
    assert fit.trace_iterations[0] == 0 and fit.trace_iterations[-1] == settings.steps
    if options.get("mgda", True):  # the losses fall
        assert bool((fit.loss_trace[:, -1].sum(0) < fit.loss_trace[:, 0].sum(0)).all())


def test_a_model_with_no_triplet_kept_does_not_poison_the_weight():
    """With ε below the first singular value's share, no triplet of that model is kept: its loss is zero.

    When only one of the two models is so cut, FusionBench divides its zero gradient by its zero
    loss and returns NaN weights; here that normalised gradient is zero, so the min-norm weight
    goes to it (0.999) and the other model's loss still pulls W (docs/methods/dop.md).
    """
    g = torch.Generator().manual_seed(5)
    pretrained = torch.randn(1, 24, 24, generator=g)
    dominant = torch.randn(1, 24, 1, generator=g) @ torch.randn(1, 1, 24, generator=g)
    merged = pretrained + 0.1 * dominant + 0.001 * torch.randn(1, 24, 24, generator=g)  # s1 holds most of Σs
    new = pretrained + 0.01 * torch.randn(1, 24, 24, generator=g)  # a flat spectrum
    options = {"steps": 30, "svd_epsilon": 0.5}
    assert bool(torch.isnan(reference_dop_weight(pretrained[0], merged[0], new[0], **options)).all())
    fit = fit_matrices(pretrained, merged, new, DOPSettings(**options))
    assert fit.ranks[0, 0] == 0 < fit.ranks[0, 1] and bool(torch.isfinite(fit.weights).all())
    assert fit.weight_trace[-1, 0] > 0.8  # the EMA moves from 0.8 towards 0.999
    assert float(fit.loss_trace[1, -1].sum()) < float(fit.loss_trace[1, 0].sum())


def test_min_norm_weights_minimise_the_combined_norm():
    g = torch.Generator().manual_seed(3)
    cases = [torch.randn(2, 50, generator=g) for _ in range(40)]
    cases.append(torch.stack([torch.ones(50), 2 * torch.ones(50)]))  # ⟨g1, g2⟩ ≥ ‖g1‖²: 0.999
    cases.append(torch.stack([2 * torch.ones(50), torch.ones(50)]))  # ⟨g1, g2⟩ ≥ ‖g2‖²: 0.001
    dots = torch.tensor([[float(c[a] @ c[b]) for a, b in ((0, 0), (0, 1), (1, 1))] for c in cases], dtype=torch.float64)
    weights = min_norm_weights(dots[:, 0], dots[:, 1], dots[:, 2])
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    for case, (d11, d12, d22), (gamma, rest) in zip(cases, dots.tolist(), weights.tolist(), strict=True):
        assert (gamma, rest) == pytest.approx(reference_min_norm(d11, d12, d22), abs=1e-12)
        assert gamma + rest == pytest.approx(1.0)
        norms = [(gamma_ * case[0].double() + (1 - gamma_) * case[1].double()).norm() for gamma_ in grid]
        best = float(min(norms))
        got = float((gamma * case[0].double() + rest * case[1].double()).norm())
        if 0.001 < gamma < 0.999:
            assert got <= best + 1e-9
    assert weights[-2].tolist() == [0.999, pytest.approx(0.001)] and weights[-1, 0] == 0.001


def test_trace_iterations_cover_the_run():
    assert trace_iterations(200) == [*range(0, 200, 10), 200]
    assert trace_iterations(0) == [0]
    assert trace_iterations(7) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_merger_follows_the_rule_parameter_by_parameter():
    """Step 1 takes θ1; then each q, k, v slice and linear weight is fitted, everything else averaged."""
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, seed) for seed in (1, 2, 3)]
    merger = create_merger("dop", {"steps": 25})
    merger.start(pretrained)
    first = merger.step(models[0])
    assert all(torch.equal(first.merged[k], models[0][k]) for k in pretrained)
    assert first.diagnostics.get("merged_weight") is None
    previous = {k: v.clone() for k, v in first.merged.items()}
    result = merger.step(models[1])
    settings = {f: getattr(merger.settings, f) for f in FIELDS}
    fitted = 0
    for key, value in result.merged.items():
        views = matrix_views(key, value)
        if key == "class_embedding":  # FusionBench's loop never reaches it: θ0's from step 2 on
            assert torch.equal(value, pretrained[key])
            continue
        if not views:
            torch.testing.assert_close(value, (previous[key] + models[1][key]) / 2, rtol=0, atol=1e-7)
            continue
        for (label, got), (_, w0), (_, wm), (_, wt) in zip(
            views,
            matrix_views(key, pretrained[key]),
            matrix_views(key, previous[key]),
            matrix_views(key, models[1][key]),
            strict=True,
        ):
            expected = reference_dop_weight(w0, wm, wt, **settings)
            assert relative(got, expected, (wm + wt) / 2) < 1e-4, label
            fitted += 1
    assert fitted == TINY.layers * 6  # q, k, v, out, c_fc, c_proj per block
    diagnostics = result.diagnostics
    assert set(diagnostics["losses"]) == {"attn.q", "attn.k", "attn.v", "attn.out", "mlp.c_fc", "mlp.c_proj"}
    assert diagnostics["trace_iterations"] == trace_iterations(25) == [*range(0, 25, 2), 25]
    assert len(diagnostics["weight_trace"]) == 14
    assert 0.0 < diagnostics["merged_weight"] < 1.0
    assert DOP.step_summary(diagnostics) == [f"w_merged={diagnostics['merged_weight']:.3f}"]


def test_chunks_do_not_change_the_result(monkeypatch):
    """Memory is bounded by optimising matrices of one shape in chunks: any chunk size gives the same weights."""
    pretrained = random_encoder(TINY)
    models = [finetuned(pretrained, seed) for seed in (1, 2)]

    def run():
        merger = create_merger("dop", {"steps": 10})
        merger.start(pretrained)
        for model in models:
            merged = merger.step(model).merged
        return {k: v.clone() for k, v in merged.items()}

    whole = run()
    monkeypatch.setattr("merging.methods.dop.CHUNK_BYTES", 1)  # one matrix at a time
    single = run()
    for key in whole:
        torch.testing.assert_close(single[key], whole[key], rtol=0, atol=1e-6)


def test_live_figure_shows_weights_and_losses():
    from merging.experiment.results import MethodResults

    pretrained = random_encoder(TINY)
    merger = create_merger("dop", {"steps": 10})
    merger.start(pretrained)
    steps = [merger.step(finetuned(pretrained, seed)).diagnostics for seed in (1, 2, 3)]
    results = MethodResults.from_json(
        "dop",
        {"accuracy": [{} for _ in steps], "steps": [{"diagnostics": d, "merge_seconds": 0.1} for d in steps]},
        ["a", "b", "c"],
    )
    figure = DOP.live_figure(results)
    names = [trace.name for trace in figure.data]
    assert names[:2] == ["step 2", "step 3"] and "mlp.c_fc (merged)" in names and "attn.q (new)" in names


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        ({"lr": 0}, "lr=0"),
        ({"steps": -1}, "steps=-1"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"svd_epsilon": 2}, "svd_epsilon=2"),
        ({"ema_beta": -0.1}, "ema_beta=-0.1"),
        ({"proj_space": "w"}, "proj_space=w"),
        ({"mgda": "maybe"}, "mgda=maybe"),
    ],
)
def test_bad_options_name_the_culprit(options, culprit):
    with pytest.raises(OptionError, match=f"dop option {culprit} is"):
        create_merger("dop", options)


def test_a_network_without_linear_weights_is_refused():
    from merging.errors import MergingError
    from merging.families import get_family

    merger = create_merger("dop")
    with pytest.raises(MergingError, match="not a CLIP ViT"):  # no family knows it
        merger.start({"embedding": torch.zeros(4, 3), "scale": torch.ones(3)})
    pretrained = random_encoder(TINY)
    others = {k: v for k, v in pretrained.items() if not matrix_views(k, v)}
    with pytest.raises(MergingError, match="dop fits linear weights, and the pretrained encoder has none"):
        merger.start(others, family=get_family("clip_vit"))


def test_equals_fusionbench(tmp_path):
    """FusionBench 0.2.33's ContinualDOPForCLIP on the same CLIPVisionModel checkpoints, defaults of dop.yaml."""
    pytest.importorskip("fusion_bench")
    transformers = pytest.importorskip("transformers")
    from fusion_bench.method.dop.dop import ContinualDOPForCLIP

    pretrained = {k: v for k, v in random_encoder(TINY).items() if k != "proj"}
    models = [finetuned(pretrained, seed) for seed in (1, 2, 3)]
    load = transformers.CLIPVisionModel.from_pretrained
    hf_pretrained = load(write_hf(pretrained, tmp_path / "base"))
    hf_models = [load(write_hf(m, tmp_path / f"ft{i}")) for i, m in enumerate(models)]
    reference = ContinualDOPForCLIP(
        lr=1e-4, num_steps=200, mgda=True, ema=True, ema_beta=0.999, alpha=0.8, svd_epsilon=0.99999, svd_proj_space="uv"
    )
    merged_hf = hf_models[0]
    for index in (1, 2):
        merged_hf = reference._layer_wise_optimize(
            model_names=["merged", f"ft{index}"],
            pretrained_model=deepcopy(hf_pretrained),
            finetuned_models={"merged": merged_hf, f"ft{index}": hf_models[index]},
            model_idx=index,
        )
    expected = to_canonical({k: v.detach() for k, v in merged_hf.state_dict().items()})
    merger = create_merger("dop")
    merger.start(pretrained)
    for model in models:
        ours = merger.step(model).merged
    assert set(ours) == set(expected)
    for key in ours:  # relative to the merged task vector, a stricter yardstick than to the weight
        scale = float((expected[key] - pretrained[key]).norm())
        difference = float((ours[key] - expected[key]).norm())
        assert difference <= 1e-3 * scale, f"{key}: {difference:.2e} against a task vector of {scale:.2e}"
    assert torch.equal(ours["class_embedding"], pretrained["class_embedding"])
