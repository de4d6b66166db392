"""MINGLE against the authors' code (zihuanqiu/MINGLE @ 928ed62): the explicit tower, the experts, the
gate projection with adaptive relaxation, the seed data, memory growth, saving, and its refusals."""

from __future__ import annotations

import gc
import itertools
import math

import pytest
import torch

from merging.cli.main import main
from merging.errors import CheckpointError, MergingError, OptionError
from merging.methods import create_merger
from merging.methods._mingle_model import MingleEncoder, TowerConfig, load, site_tensors
from merging.methods.mingle import MINGLE, entropy_rank, kd_loss, project_expert, project_gradient

from .encoders import TINY, finetuned, random_encoder, ready_merger, toy_context, write_hf
from .test_evaluation import tiny_backbone  # noqa: F401 (a fixture)
from .test_streaming import held_bytes

QUICK = {"steps": 4, "rank": 8}


@pytest.fixture(scope="module")
def pretrained():
    return random_encoder(TINY)


@pytest.fixture(scope="module")
def models(pretrained):
    return [finetuned(pretrained, seed, scale=0.05) for seed in (1, 2, 3)]


def tower(state):
    encoder = TINY.build_open_clip()
    encoder.load_state_dict(state)
    return encoder


def merged_after(pretrained, models, count=2, **options):
    merger, result = ready_merger("mingle", pretrained, {**QUICK, **options}), None
    for index, model in enumerate(models[:count]):
        result = merger.step(model, task=f"toy-{index}")
    return merger, result


def images(n=5, seed=0):
    return torch.randn(n, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the explicit tower


def test_explicit_forward_without_experts_equals_open_clip(pretrained):
    encoder = tower(pretrained)
    model = MingleEncoder(pretrained, TowerConfig.from_module(encoder), {})
    with torch.no_grad():
        torch.testing.assert_close(model(images()), encoder(images()), atol=1e-5, rtol=1e-5)


def test_zero_gates_give_the_pretrained_tower(pretrained, models):
    merger, result = merged_after(pretrained, models)
    for experts in merger.experts.values():
        experts.gate_weight.zero_()
        experts.gate_bias.zero_()
    with torch.no_grad():
        torch.testing.assert_close(result.model(images()), tower(pretrained)(images()), atol=1e-5, rtol=1e-5)


def test_one_image_equals_the_plain_tower_with_its_observed_coefficients(pretrained, models):
    """Each layer computes x (W0 + Σ_e g_e B_e A_e)ᵀ + b0 with g_e = w_e · mean(x) + b_e."""
    merger, result = merged_after(pretrained, models)
    for experts in merger.experts.values():  # coefficients of order one, so the experts matter
        experts.gate_bias.fill_(0.7)
    seen = {}
    result.model.observer = lambda label, x, c: seen.setdefault(label, c[0].clone())
    with torch.no_grad():
        routed = result.model(images(1))
    result.model.observer = None
    assert set(seen) == set(merger.experts) and len(seen) == 2 * 6
    plain = tower(result.model.collapsed(seen))
    with torch.no_grad():
        torch.testing.assert_close(routed, plain(images(1)), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(routed, tower(pretrained)(images(1)), atol=1e-3)


def test_routing_per_batch_per_sample_and_chunks(pretrained, models):
    merger, result = merged_after(pretrained, models)
    for experts in merger.experts.values():
        experts.gate_weight.normal_(0, 0.3)
    model, batch = result.model, images(4)
    with torch.no_grad():
        per_image = torch.cat([model(batch[i : i + 1]) for i in range(4)])
        whole = model(batch)
        model.chunk = 2
        chunked = model(batch)
        halves = torch.cat([model(batch[:2]), model(batch[2:])])
        model.routing = "sample"
        sample = model(batch)
    assert not torch.allclose(whole, per_image, atol=1e-4)  # one coefficient per batch
    torch.testing.assert_close(chunked, halves)  # ... per chunk of eval_batch images
    torch.testing.assert_close(sample, per_image, atol=1e-5, rtol=1e-5)  # routing=sample: per image


# ---------------------------------------------------------------- experts


def code_projection(tau, previous, diag):
    """construct_lora as written: full SVD, rotate, zero the top-left k_eff block (and the diagonal), rotate back."""
    u, s, vh = torch.linalg.svd(previous.double(), full_matrices=True)
    p = s / s.sum()
    k = int(torch.exp(-(p * torch.log(p)).sum()))
    rotated = u.T @ tau.double() @ vh.T
    if diag:
        rotated.diagonal().zero_()
    rotated[:k, :k] = 0
    return u @ rotated @ vh, k


@pytest.mark.parametrize("shape", [(12, 12), (20, 12), (12, 20)])
@pytest.mark.parametrize("mode", ["block", "block_diag"])
def test_expert_projection_equals_the_codes_full_rotation(shape, mode):
    g = torch.Generator().manual_seed(1)
    previous = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
    previous += 0.01 * torch.randn(shape, generator=g)
    tau = torch.randn(shape, generator=g)
    mine, k = project_expert(tau.double(), previous.double(), mode)  # float64: the tail vectors are ill-conditioned
    theirs, k_code = code_projection(tau, previous, diag=mode == "block_diag")
    assert k == k_code and 1 <= k < min(shape)
    torch.testing.assert_close(mine, theirs, atol=1e-9, rtol=1e-9)


def test_entropy_rank():
    assert entropy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 4
    assert entropy_rank(torch.tensor([1.0, 0.0, 0.0])) == 1  # 0 log 0 = 0, not NaN
    assert entropy_rank(torch.tensor([3.0, 1.0])) == math.floor(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    )


def test_first_expert_is_the_rank_r_task_vector_and_merged_is_the_expert_sum(pretrained, models):
    merger = ready_merger("mingle", pretrained, {"steps": 0, "rank": 64})  # 64 ≥ every TINY width: exact
    merger.step(models[0], task="toy-a")
    for label, experts in merger.experts.items():
        layer, site = label.split(".")
        tau = site_tensors(models[0], int(layer), site)[0] - site_tensors(pretrained, int(layer), site)[0]
        torch.testing.assert_close(experts.B[0] @ experts.A[0], tau, atol=1e-5, rtol=1e-4)
    merger.step(models[1], task="toy-b")
    view = merger._model.expert_sum()
    assert all(torch.allclose(merger.merged[k], view[k], atol=1e-6) for k in pretrained)
    # everything outside the adapted layers stays θ0, as in the code (only nn.Linear weights get experts)
    for key in ("ln_post.bias", "transformer.resblocks.0.attn.in_proj_bias", "conv1.weight", "proj"):
        assert torch.equal(merger.merged[key], pretrained[key])


def test_attn_fc1_leaves_fc2_at_pretrained(pretrained, models):
    merger, _ = merged_after(pretrained, models, layers="attn_fc1")
    assert not any(label.endswith("fc2") for label in merger.experts)
    assert torch.equal(
        merger.merged["transformer.resblocks.1.mlp.c_proj.weight"],
        pretrained["transformer.resblocks.1.mlp.c_proj.weight"],
    )


# ---------------------------------------------------------------- gates


def test_kd_loss_is_the_codes():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    expected = -(torch.softmax(teacher / 2, 1) * torch.log_softmax(student / 2, 1)).sum() / 4
    torch.testing.assert_close(kd_loss(student, teacher, 2.0), expected)


def test_gradient_projection_with_adaptive_relaxation():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 3, generator=g))[0]
    grad = torch.randn(1, 10, generator=g)
    hard, h = project_gradient(grad, basis, None, gamma=0.0, beta=0.99)
    assert torch.allclose(hard @ basis, torch.zeros(1, 3), atol=1e-6)  # γ = 0: the null space exactly
    r = ((grad @ basis).abs() / grad.norm()).mean(0)
    torch.testing.assert_close(h, 0.01 * r)  # h starts at 0: h = β·0 + (1 − β) r
    soft, h2 = project_gradient(grad, basis, h, gamma=5.0, beta=0.99)
    torch.testing.assert_close(h2, 0.99 * h + 0.01 * r)
    lam = torch.exp(-5.0 * h2)
    torch.testing.assert_close(soft @ basis, (grad @ basis) * (1 - lam), atol=1e-6, rtol=1e-5)


def test_gates_learn_the_teacher_and_only_the_new_gate_changes(pretrained, models):
    options = {"steps": 25, "lr": 0.05, "batch_size": 1000, "rank": 8}
    merger = ready_merger("mingle", pretrained, options)
    first = merger.step(models[0], task="toy-a").diagnostics
    assert first["kd_loss"][-1] < first["kd_loss"][0]
    old = {label: (e.gate_weight[0].clone(), e.gate_bias[0].clone()) for label, e in merger.experts.items()}
    second = merger.step(models[1], task="toy-b").diagnostics
    assert second["kd_loss"][-1] < second["kd_loss"][0]
    for label, (weight, bias) in old.items():
        assert torch.equal(merger.experts[label].gate_weight[0], weight)
        assert torch.equal(merger.experts[label].gate_bias[0], bias)
    assert 0 < second["relaxation"]["min"] <= second["relaxation"]["mean"] <= 1
    assert first["relaxation"] is None  # no subspace yet at task 1


def test_constraint_changes_the_second_gate_only(pretrained, models):
    on, _ = merged_after(pretrained, models, steps=6, lr=0.01)
    off, _ = merged_after(pretrained, models, steps=6, lr=0.01, constraint=False)
    label = "0.q"
    assert torch.equal(on.experts[label].gate_weight[0], off.experts[label].gate_weight[0])
    assert not torch.allclose(on.experts[label].gate_weight[1], off.experts[label].gate_weight[1])


def test_subspaces_grow_by_k_per_task_and_are_orthonormal(pretrained, models):
    merger, result = merged_after(pretrained, models, count=3, subspace_k=2)
    assert set(merger.subspaces) == {f"{i}.{g}" for i in range(2) for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    for basis in merger.subspaces.values():
        assert basis.shape[1] == 6
        torch.testing.assert_close(basis.T @ basis, torch.eye(6), atol=1e-5, rtol=0)
    assert result.diagnostics["subspace_dim"] == 6


# ---------------------------------------------------------------- data, diagnostics, memory


def test_seed_images_are_k_per_class_of_the_test_split_and_said_so(pretrained, models):
    merger = ready_merger("mingle", pretrained, {**QUICK, "seed_per_class": 3})
    calls = []
    images = merger.context.images
    merger.context.images = lambda task, split: calls.append(split) or images(task, split)
    diagnostics = merger.step(models[0], task="toy-a").diagnostics
    assert set(calls) == {"test"}
    labels = images("toy-a", "test").labels
    chosen, _ = merger._seed_indices("toy-a")
    expected = sum(min(3, int((labels == c).sum())) for c in labels.unique())
    assert len(chosen) == diagnostics["seed_images"] == expected
    assert all(int((labels[chosen] == c).sum()) == min(3, int((labels == c).sum())) for c in labels.unique())
    assert torch.equal(chosen, merger._seed_indices("toy-a")[0])  # deterministic
    assert "3 per class" in diagnostics["data"] and "test sample" in diagnostics["data"]
    assert "5 unlabelled test images per class" in MINGLE.summary


def test_memory_grows_by_exactly_the_experts_gates_and_subspaces(pretrained):
    merger = ready_merger("mingle", pretrained, QUICK)
    sizes, added = [], []
    for seed in range(1, 5):
        model = finetuned(pretrained, seed)
        added.append(merger.step(model, task=f"toy-{seed}").diagnostics["added_bytes"])
        del model
        gc.collect()
        sizes.append(held_bytes(merger))
    growth = [b - a for a, b in itertools.pairwise(sizes)]
    assert growth == added[1:] == [merger.per_task_bytes()] * 3  # subspaces not yet saturated
    # the evaluated module shares the merger's tensors: no second copy
    assert held_bytes(merger._model) < sizes[-1]


def test_gate_activations_cover_every_seen_task_and_expert(pretrained, models):
    _, result = merged_after(pretrained, models, count=3)
    activations = result.diagnostics["gate_activations"]
    assert list(activations) == ["toy-0", "toy-1", "toy-2"] and all(len(v) == 3 for v in activations.values())
    MINGLE.check_diagnostics(result.diagnostics)


def test_live_figure(pretrained, models):
    from merging.experiment.results import MethodResults, StepRecord

    merger, _ = merged_after(pretrained, models, count=0)
    results = MethodResults("mingle", merger.config, ["toy-0", "toy-1"])
    for index, model in enumerate(models[:2]):
        d = merger.step(model, task=f"toy-{index}").diagnostics
        results.steps.append(StepRecord({}, 1.0, 1.0, None, None, d))
    figure = MINGLE.live_figure(results)
    names = {t.name for t in figure.data}
    assert {"gate coefficient", "step 1", "step 2", "added bytes"} <= names


# ---------------------------------------------------------------- saving


def test_save_and_load_round_trip(tmp_path, pretrained, models):
    merger, result = merged_after(pretrained, models)
    path = merger.save(tmp_path / "mingle.safetensors")
    loaded, subspaces, config = load(path)
    assert config["tasks"] == ["toy-0", "toy-1"] and config["options"]["rank"] == 8
    assert set(subspaces) == set(merger.subspaces)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), result.model(images()))
    slim = merger.save(tmp_path / "slim.safetensors", include_base=False)
    assert slim.stat().st_size < path.stat().st_size
    with pytest.raises(CheckpointError, match="holds no base weights"):
        load(slim)
    again, _, _ = load(slim, pretrained=pretrained)
    with torch.no_grad():
        torch.testing.assert_close(again(images()), result.model(images()))
    with pytest.raises(CheckpointError, match="is not a MINGLE model"):
        write = tmp_path / "plain.safetensors"
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(write))
        load(write)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, r"mingle option rank=0 is out of range: must be an integer in \[1, inf\]"),
        ({"beta": 1.5}, r"mingle option beta=1.5 is out of range"),
        ({"lr": 0}, r"mingle option lr=0 is out of range"),
        ({"routing": "token"}, "mingle option routing=token is invalid: must be one of batch, sample"),
        ({"layers": "all"}, "must be one of attn_mlp, attn_fc1"),
    ],
)
def test_options_out_of_range(options, message):
    with pytest.raises(OptionError, match=message):
        create_merger("mingle", options)


def test_without_task_data_merge_refuses_in_one_line(tmp_path, capsys, pretrained, models):
    merger = create_merger("mingle")
    merger.start(pretrained)
    with pytest.raises(MergingError, match="needs task data"):
        merger.step(models[0])
    base = write_hf(pretrained, tmp_path / "base")
    fine = write_hf(models[0], tmp_path / "fine")
    code = main(["merge", "--method", "mingle", "--pretrained", str(base), "--checkpoint", str(fine),
                 "--out", str(tmp_path / "o.safetensors"), "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "mingle learns from images of each task" in err


def test_non_clip_encoder_is_named():
    merger = create_merger("mingle")
    mlp = {"layers.0.weight": torch.randn(4, 3), "layers.0.bias": torch.zeros(4)}
    with pytest.raises(
        CheckpointError, match=r"^mingle merges CLIP ViT image encoders only; the pretrained encoder is a mlp model$"
    ):
        merger.start(mlp)


def test_unsupported_tower_is_named(pretrained, models):
    merger = create_merger("mingle", QUICK)
    context = toy_context(pretrained)
    context.encoder.transformer.resblocks[0].ls_1 = torch.nn.Linear(1, 1)  # a layer-scale variant
    merger.attach(context)
    merger.start(pretrained)
    with pytest.raises(MergingError, match=r"^mingle: the backbone's image tower has layer scale, which"):
        merger.step(models[0], task="toy-a")


# ---------------------------------------------------------------- the evaluation seam


def test_evaluator_runs_a_methods_own_model(tmp_path, tiny_backbone):  # noqa: F811 (the imported fixture)
    from merging.evaluation.evaluator import Evaluator

    from .test_evaluation import colour_images, registry_for, write_dataset

    pictures, labels = colour_images(20, seed=5)
    write_dataset(tmp_path / "toy", "test", pictures, labels)
    task = registry_for(tmp_path / "toy").get("toy")
    evaluator = Evaluator(tiny_backbone, "cpu", samples=None, cache_dir=tmp_path / "cache")
    state = {k: v.float() for k, v in tiny_backbone.model.visual.state_dict().items()}
    plain = MingleEncoder(state, TowerConfig.from_module(tiny_backbone.model.visual), {})
    data = evaluator.test_set(task).images
    reference = evaluator.features(data)
    assert evaluator.evaluate(None, [task], model=plain) == evaluator.evaluate(None, [task])
    calls = []
    plain.observer = None
    spy = type("Spy", (torch.nn.Module,), {"forward": lambda self, x: calls.append(len(x)) or plain(x)})()
    evaluator.evaluate(None, [task], model=spy)
    assert sum(calls) == len(data)  # the model, not the tower, computed the features
    torch.testing.assert_close(evaluator.features(data), reference, atol=1e-5, rtol=1e-5)
    evaluator.evaluate(None, [task])  # loading an encoder puts the tower back
    calls.clear()
    evaluator.features(data)
    assert calls == []


def test_lab_downloads_and_pushes_the_routed_model(tmp_path, monkeypatch):
    """The lab writes MINGLE's own model beside its encoder view, and a Hub push sends the model."""
    from merging.experiment.runner import ContinualRun, RunConfig, preset_checkpoints
    from merging.ui import lab

    config = RunConfig(
        checkpoints=preset_checkpoints("mini-8")[:2],
        methods={"mingle": QUICK, "task_arithmetic": {}},
        samples=40,
        device="cpu",
    )
    run = ContinualRun(config, cache_dir=tmp_path / "cache")
    run.run()
    written = {p.name: p for p in lab.write_downloads(run, tmp_path / "out", encoders=True)}
    assert {
        "merged-mingle.model.safetensors",
        "merged-mingle.safetensors",
        "merged-task_arithmetic.safetensors",
    } <= set(written)
    assert "merged-task_arithmetic.model.safetensors" not in written  # plain encoders have no model of their own
    model, _, saved = load(written["merged-mingle.model.safetensors"])
    assert saved["tasks"] == [c.task for c in config.checkpoints]
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(batch), run.mergers["mingle"].merged_model()(batch))
    pushed = {}
    monkeypatch.setattr(lab, "push_files", lambda named, *args: pushed.update(named) or "url")
    lab.push_to_hub(list(written.values()), "mingle", "me/merged", "hf_token")
    assert pushed["model.safetensors"] == written["merged-mingle.model.safetensors"]
    lab.push_to_hub(list(written.values()), "task_arithmetic", "me/merged", "hf_token")
    assert pushed["model.safetensors"] == written["merged-task_arithmetic.safetensors"]
