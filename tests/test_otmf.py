"""OTMF against ALGORITHMS.md: the masked interpolation, the schedules, keep=best, the OT losses."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from merging.errors import MergingError, OptionError
from merging.methods import create_merger
from merging.methods import otmf as otmf_module
from merging.methods._ot_loss import exact_ot, sinkhorn_divergence
from merging.methods._otmf_reference import PerParameterOTMF
from merging.methods.otmf import OTMF, mask_summary

from .encoders import TINY, finetuned, random_encoder, ready_merger, toy_context
from .test_streaming import held_bytes


@pytest.fixture(scope="module")
def pretrained():
    return random_encoder(TINY)


@pytest.fixture(scope="module")
def models(pretrained):
    return [finetuned(pretrained, seed, scale=0.05) for seed in (1, 2, 3)]


class Recording(OTMF):
    """OTMF that keeps the masks each step chose, so tests can look at them."""

    def _optimise(self, layout, pretrained, scaled, teachers):
        masks, diagnostics = super()._optimise(layout, pretrained, scaled, teachers)
        self.chosen = {s: {k: m.clone() for k, m in layout.views(masks[s].detach()).items()} for s in masks}
        return masks, diagnostics


def recording(pretrained, **options) -> Recording:
    merger = Recording(**options)
    merger.attach(toy_context(pretrained))
    merger.start(pretrained)
    return merger


def two_steps(merger, models):
    merger.step(models[0], task="toy-a")
    return merger.step(models[1], task="toy-b")


def interpolation(pretrained, models, alpha):
    return {
        k: pretrained[k] + alpha * (models[0][k] - pretrained[k]) + (1 - alpha) * (models[1][k] - pretrained[k])
        for k in pretrained
    }


@pytest.mark.parametrize("options", [{"masks": "off"}, {"steps": 0}, {"masks": "off", "alpha": 0.3}])
def test_masks_at_one_give_the_alpha_interpolation(pretrained, models, options):
    merger = ready_merger("otmf", pretrained, options)
    first = merger.step(models[0], task="toy-a")
    assert all(torch.equal(first.merged[k], models[0][k]) for k in pretrained)  # step 1 takes θ1 as it is
    result = merger.step(models[1], task="toy-b")
    expected = interpolation(pretrained, models, merger.config["alpha"])
    for k in pretrained:
        torch.testing.assert_close(result.merged[k], expected[k], rtol=1e-6, atol=1e-7)
    assert "masks" not in result.diagnostics


def test_the_merged_encoder_is_theta_of_the_chosen_masks(pretrained, models):
    merger = recording(pretrained, steps=6)
    result = two_steps(merger, models)
    alpha = merger.config["alpha"]
    for k in pretrained:
        expected = (
            pretrained[k]
            + alpha * merger.chosen["pre"][k] * (models[0][k] - pretrained[k])
            + (1 - alpha) * merger.chosen["post"][k] * (models[1][k] - pretrained[k])
        )
        torch.testing.assert_close(result.merged[k], expected, rtol=1e-5, atol=1e-6)


def test_alternating_schedule_trains_one_mask_set_per_step(pretrained, models):
    one = recording(pretrained, steps=1, keep="last")
    two_steps(one, models)
    assert any(not torch.all(m == 1) for m in one.chosen["pre"].values())
    assert all(torch.all(m == 1) for m in one.chosen["post"].values())
    two = recording(pretrained, steps=2, keep="last")
    result = two_steps(two, models)
    assert any(not torch.all(m == 1) for m in two.chosen["post"].values())
    assert all(torch.equal(one.chosen["pre"][k], two.chosen["pre"][k]) for k in pretrained)  # step 1 left pre alone
    assert len(result.diagnostics["loss_pre"]) == 1 and len(result.diagnostics["loss_post"]) == 1
    joint = recording(pretrained, steps=1, keep="last", schedule="joint")
    result = two_steps(joint, models)
    assert all(any(not torch.all(m == 1) for m in joint.chosen[s].values()) for s in ("pre", "post"))
    assert len(result.diagnostics["loss_pre"]) == 1 and len(result.diagnostics["loss_post"]) == 1


# learning rates at which each schedule's lowest loss on the toy data is not at its last step
@pytest.mark.parametrize(("schedule", "lr"), [("alternate", 0.05), ("joint", 0.1)])
def test_keep_best_returns_the_masks_of_the_lowest_loss(pretrained, models, schedule, lr):
    steps = 12
    best = recording(pretrained, steps=steps, keep="best", schedule=schedule, lr=lr)
    result = two_steps(best, models)
    diagnostics = result.diagnostics
    if schedule == "joint":
        totals = [a + b for a, b in zip(diagnostics["loss_pre"], diagnostics["loss_post"], strict=True)]
        lowest = min(range(steps), key=totals.__getitem__)
        assert diagnostics["best_step"] == {"pre": lowest, "post": lowest}
        last_measured = {"pre": steps - 1, "post": steps - 1}
    else:
        pre_lowest = min(range(len(diagnostics["loss_pre"])), key=diagnostics["loss_pre"].__getitem__)
        post_lowest = min(range(len(diagnostics["loss_post"])), key=diagnostics["loss_post"].__getitem__)
        assert diagnostics["best_step"] == {"pre": 2 * pre_lowest, "post": 2 * post_lowest + 1}
        last_measured = {"pre": steps - 2, "post": steps - 1}
    # the data make keep=best and keep=last genuinely different choices
    assert all(diagnostics["best_step"][name] < last_measured[name] for name in ("pre", "post")), diagnostics
    # the masks a step was measured at are those a run stopped right before it ends with
    for name in ("pre", "post"):
        step = diagnostics["best_step"][name]
        prefix = recording(pretrained, steps=step, keep="last", schedule=schedule, lr=lr)
        two_steps(prefix, models)
        chosen = prefix.chosen[name] if step > 0 else {k: torch.ones_like(v) for k, v in pretrained.items()}
        for k in pretrained:
            torch.testing.assert_close(best.chosen[name][k], chosen[k], rtol=0, atol=0)
    last = recording(pretrained, steps=steps, keep="last", schedule=schedule, lr=lr)
    two_steps(last, models)
    for name in ("pre", "post"):
        assert any(not torch.equal(last.chosen[name][k], best.chosen[name][k]) for k in pretrained), name


@pytest.mark.parametrize(
    "options",
    [
        {"steps": 8, "lr": 0.05},
        {"steps": 6, "lr": 0.1, "schedule": "joint", "keep": "last", "alpha": 0.6},
        {"steps": 4, "ot": "sinkhorn"},
        {"masks": "off"},
    ],
)
def test_flat_buffers_merge_what_the_per_parameter_formulation_merges(pretrained, models, options):
    """Three steps (two fusions) against the pre-flat code, kept in _otmf_reference: same weights to
    float32 rounding (bit for bit on this machine), same loss curves and best steps, same mask statistics."""
    compare_with_reference(pretrained, models, options, tolerance=1e-6)


def test_fused_adam_as_on_cuda_stays_close_to_the_per_parameter_formulation(pretrained, models, monkeypatch):
    """CUDA's configuration run on the CPU: fused Adam rounds differently from the plain loop, and
    Adam's division by √v lets that move a few entries whose gradient is mostly rounding; nothing more."""
    monkeypatch.setattr(otmf_module, "_FUSED_ADAM_DEVICES", ("cuda", "cpu"))
    compare_with_reference(pretrained, models, {"steps": 6, "lr": 0.05}, tolerance=1e-4)


def test_checkpoints_without_some_parameters_fuse_the_rest_and_keep_those_pretrained(pretrained, models):
    """Merged parameters fewer than θ0's (no projection in a CLIPVisionModel): the flat buffers then
    cover only those, copied out of θ0 and the merged model, and the others stay θ0's."""
    partial = [{k: v for k, v in model.items() if k != "proj"} for model in models]
    runs = compare_with_reference(pretrained, partial, {"steps": 4}, tolerance=1e-6)
    assert torch.equal(runs[0][-1][0]["proj"], pretrained["proj"])


def compare_with_reference(pretrained, models, options, tolerance):
    runs = []
    for kind in (OTMF, PerParameterOTMF):
        merger = kind(**options)
        merger.attach(toy_context(pretrained))
        merger.start(pretrained)
        results = [merger.step(model, task=f"toy-{i}") for i, model in enumerate(models)]
        runs.append([({k: v.clone() for k, v in r.merged.items()}, r.diagnostics) for r in results])
    for (flat, flat_diagnostics), (reference, reference_diagnostics) in zip(*runs, strict=True):
        for k in pretrained:
            torch.testing.assert_close(flat[k], reference[k], rtol=10 * tolerance, atol=tolerance)
        assert flat_diagnostics.keys() == reference_diagnostics.keys()
        for name in ("loss_pre", "loss_post"):
            if name in reference_diagnostics:
                assert flat_diagnostics[name] == pytest.approx(reference_diagnostics[name], rel=100 * tolerance)
        assert flat_diagnostics.get("best_step") == reference_diagnostics.get("best_step")
        for which, summary in reference_diagnostics.get("masks", {}).items():
            assert flat_diagnostics["masks"][which]["mean"] == pytest.approx(summary["mean"], rel=tolerance)
            assert flat_diagnostics["masks"][which]["std"] == pytest.approx(summary["std"], rel=1e3 * tolerance)
    if options.get("masks") != "off":
        assert any(not torch.equal(runs[0][-1][0][k], models[-1][k]) for k in models[-1])
    return runs


def test_otmf_keeps_theta0_and_the_merged_model_in_flat_buffers(pretrained, models):
    """The mask updates read θ0 and θm without a copy: both dicts are views of one buffer each."""
    merger = ready_merger("otmf", pretrained, {"steps": 2})
    merger.step(models[0], task="toy-a")
    merger.step(models[1], task="toy-b")
    for state in (merger.pretrained, merger.merged):
        storages = {t.untyped_storage().data_ptr() for t in state.values()}
        assert len(storages) == 1
        assert all(t.is_contiguous() for t in state.values())
    torch.testing.assert_close(merger.pretrained["class_embedding"], pretrained["class_embedding"], rtol=0, atol=0)


def test_mask_summary_of_a_flat_mask_equals_that_of_its_parts():
    generator = torch.Generator().manual_seed(0)
    parts = {"a": 1 + 0.3 * torch.randn(50, 7, generator=generator), "b": 1 + torch.randn(33, generator=generator)}
    flat = torch.cat([v.flatten() for v in parts.values()])
    by_parts, whole = mask_summary(parts), mask_summary(flat)
    assert whole.keys() == by_parts.keys() and whole["entries"] == 383
    for key in ("mean", "std", "below_0.5", "above_1.5"):
        assert whole[key] == pytest.approx(by_parts[key], rel=1e-12)
    assert whole["quantiles"] == by_parts["quantiles"]


def test_the_optimisation_lowers_the_loss_on_toy_data(pretrained, models):
    result = two_steps(recording(pretrained, steps=40, lr=0.05), models)
    for name in ("loss_pre", "loss_post"):
        curve = result.diagnostics[name]
        assert min(curve) < curve[0]
    assert result.diagnostics["masks"]["pre"]["std"] > 0


def test_memory_does_not_grow_with_tasks_and_checkpoints_are_released(pretrained):
    merger = ready_merger("otmf", pretrained, {"steps": 4, "head_tuning": "on", "head_steps": 3})
    sizes, references = [], []
    for seed in range(1, 6):
        model = finetuned(pretrained, seed)
        references.append([weakref.ref(t) for t in model.values()])
        merger.step(model, task=f"toy-{seed % 2}")  # two tasks alternate: heads do not pile up either
        del model
        gc.collect()
        sizes.append(held_bytes(merger))
    assert all(r() is None for refs in references for r in refs)
    assert sizes[2] == sizes[-1], sizes
    context_bytes = held_bytes(merger.context)  # the runner's image tower, counted since held_bytes walks dataclasses
    assert context_bytes >= sum(t.numel() * 4 for t in pretrained.values())
    assert sizes[-1] <= 3 * sum(t.numel() * 4 for t in pretrained.values()) + context_bytes


def test_head_tuning_tunes_the_previous_task_and_the_last(pretrained, models):
    merger = ready_merger("otmf", pretrained, {"steps": 2, "head_tuning": "on", "head_steps": 30})
    first = merger.step(models[0], task="toy-a")
    assert first.diagnostics["head_tuning"] == [] and merger.heads() == {}
    second = merger.step(models[1], task="toy-b")
    assert [h["task"] for h in second.diagnostics["head_tuning"]] == ["toy-a"]
    third = merger.step(models[2], task="toy-c", last=True)
    assert [h["task"] for h in third.diagnostics["head_tuning"]] == ["toy-b", "toy-c"]
    assert set(merger.heads()) == {"toy-a", "toy-b", "toy-c"}
    tuning = third.diagnostics["head_tuning"][0]
    assert tuning["images"] == 12 and len(tuning["loss"]) == 30  # 25% of the 48 labelled toy images
    assert min(tuning["loss"][-5:]) < tuning["loss"][0]
    zero_shot = toy_context(pretrained).head("toy-b")
    assert not torch.allclose(merger.heads()["toy-b"], zero_shot)


def test_options_are_validated_with_the_valid_values():
    assert create_merger("otmf").config["ot"] == "emd"
    with pytest.raises(OptionError, match="otmf option ot=wasserstein is invalid: must be one of emd, sinkhorn"):
        create_merger("otmf", {"ot": "wasserstein"})
    with pytest.raises(OptionError, match=r"otmf option alpha=2 is out of range: must be a number in \[0, 1\]"):
        create_merger("otmf", {"alpha": 2})
    with pytest.raises(OptionError, match="schedule=random is invalid: must be one of alternate, joint"):
        create_merger("otmf", {"schedule": "random"})
    with pytest.raises(OptionError, match=r"head_fraction=0 is out of range: must be a number in \(0, 1\]"):
        create_merger("otmf", {"head_fraction": 0})


def test_without_task_data_the_message_says_where_otmf_runs(pretrained, models):
    merger = create_merger("otmf")
    merger.start(pretrained)
    with pytest.raises(MergingError, match=r"otmf learns from images of each task.*python -m merging run"):
        merger.step(models[0])


def test_mask_summary():
    masks = {"a": torch.tensor([0.0, 1.0, 2.0, 1.0]), "b": torch.tensor([[1.0, 1.0], [0.4, 1.6]])}
    summary = mask_summary(masks)
    flat = torch.tensor([0.0, 1.0, 2.0, 1.0, 1.0, 1.0, 0.4, 1.6])
    assert summary["mean"] == pytest.approx(float(flat.mean()))
    assert summary["std"] == pytest.approx(float(flat.std(unbiased=False)))
    assert summary["below_0.5"] == pytest.approx(2 / 8) and summary["above_1.5"] == pytest.approx(2 / 8)
    assert summary["quantiles"]["0.5"] == pytest.approx(1.0) and summary["entries"] == 8


def test_sinkhorn_divergence_agrees_with_exact_ot_on_clip_scale_features():
    """Values within a few percent and gradient cosine > 0.8 (batch 16, 512-d features of norm ~10)."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(3):
        centre = torch.randn(1, 512, generator=generator) * 0.4
        teacher = centre + 0.3 * torch.randn(16, 512, generator=generator)
        student = teacher[torch.randperm(16, generator=generator)] + 0.2 * torch.randn(16, 512, generator=generator)
        student.requires_grad_(True)
        values, gradients = [], []
        for loss in (exact_ot, lambda x, y: sinkhorn_divergence(x, y, 0.05)):
            student.grad = None
            value = loss(student, teacher)
            value.backward()
            values.append(float(value.detach()))
            gradients.append(student.grad.flatten().clone())
        assert values[1] == pytest.approx(values[0], rel=0.03), trial
        cosine = torch.nn.functional.cosine_similarity(gradients[0], gradients[1], dim=0)
        assert cosine > 0.8, (trial, float(cosine))
        assert gradients[1].norm() == pytest.approx(float(gradients[0].norm()), rel=0.1)


def test_exact_ot_of_a_permutation_is_zero_and_of_a_shift_is_half_its_square():
    x = torch.randn(16, 8)
    assert float(exact_ot(x[torch.randperm(16)], x)) == pytest.approx(0.0, abs=1e-5)
    shift = torch.zeros(8)
    shift[0] = 3.0
    assert float(exact_ot(x + shift, x)) == pytest.approx(4.5, rel=1e-5)


# ---------------------------------------------------------------- on the mini benchmark


def test_on_the_mini_benchmark_the_loss_decreases_and_heads_are_reported(tmp_path):
    from merging.experiment.metrics import acc, bwt
    from merging.experiment.runner import ContinualRun, RunConfig, preset_checkpoints

    checkpoints = preset_checkpoints("mini-8")[:3]
    config = RunConfig(
        checkpoints=checkpoints, methods={"otmf": {"head_tuning": "on", "steps": 60}}, samples=64, device="cpu"
    )
    results = ContinualRun(config, cache_dir=tmp_path).run().to_json()
    data = results["methods"]["otmf"]
    for step in data["steps"][1:]:
        diagnostics = step["diagnostics"]
        for name in ("loss_pre", "loss_post"):
            curve = diagnostics[name]
            assert len(curve) == 30
            # single batches of 16 make each loss noisy: compare the first and last thirds of the updates
            assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10, (name, curve)
        assert diagnostics["masks"]["post"]["std"] > 0 and step["memory_increase_bytes"] is not None
    tuned = [[h["task"] for h in s["diagnostics"]["head_tuning"]] for s in data["steps"]]
    assert tuned == [[], [checkpoints[0].task], [checkpoints[1].task, checkpoints[2].task]]
    names = results["tasks"]
    for field, total, backward in (
        ("accuracy", "acc", "bwt"),
        ("accuracy_zeroshot_head", "acc_zeroshot_head", "bwt_zeroshot_head"),
    ):
        matrix = [[column.get(n) for column in data[field]] for n in names]
        assert data[total] == pytest.approx(acc(matrix)) and data[backward] == pytest.approx(bwt(matrix))
    # the first step is the first checkpoint itself, measured with its zero-shot head
    assert data["accuracy"][0] == data["accuracy_zeroshot_head"][0]
    assert data["accuracy"][0][names[0]] == pytest.approx(results["reference"]["finetuned"][names[0]])
