"""The mini benchmark's recipe bench (scripts/minibench/lab.py): its pure parts on inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scripts.minibench import build
from scripts.minibench.build import describe_recipe, finetune
from scripts.minibench.lab import (
    DEFAULT_RECIPE,
    ISOTROPIC_SCALES,
    isotropic,
    parse_recipe,
    recipe_name,
    scale_only,
    spectral_accumulation,
    upsampled,
)

BLOCK = "transformer.resblocks.0."


def test_a_recipe_overrides_only_the_keys_given_with_their_types_and_names_itself_by_them():
    recipe = parse_recipe("lr=1e-4,steps=4000,schedule=constant")
    assert recipe["lr"] == 1e-4 and recipe["steps"] == 4000 and recipe["schedule"] == "constant"
    assert isinstance(recipe["steps"], int) and recipe["batch"] == DEFAULT_RECIPE["batch"]
    assert recipe_name(recipe) == (
        "lr=0.0001,epochs=10,wd_per_step=0.0,schedule=constant,steps=4000,warmup=0.1,batch=32,images=10000"
    )
    assert recipe_name(parse_recipe("")) != recipe_name(recipe)
    with pytest.raises(SystemExit, match="unknown recipe key 'momentum'"):
        parse_recipe("momentum=0.9")
    with pytest.raises(SystemExit, match="unknown schedule 'linear'"):
        parse_recipe("schedule=linear")


def test_the_builds_default_recipe_is_fusionbenchs_and_each_recipe_describes_itself():
    default = build.parse_recipe("")
    assert default == build.FINETUNE_RECIPE and "images" not in default
    assert describe_recipe(default) == "AdamW, constant lr 0.0002, 4,000 steps of 32, no weight decay"
    ilharco = build.parse_recipe("schedule=onecycle,epochs=10,steps=0,batch=128,wd_per_step=1e-6")
    assert describe_recipe(ilharco) == (
        "AdamW, one-cycle lr 0.0002, 10 epochs in batches of 128, weight decay 0.005 (lr · wd = 1e-06 per step, "
        "as in the real recipe)"
    )


def _state(c_fc: torch.Tensor) -> dict[str, torch.Tensor]:
    return {BLOCK + "mlp.c_fc.weight": c_fc, BLOCK + "ln_1.weight": torch.ones(c_fc.shape[1])}


def test_spectral_accumulation_is_one_over_root_t_for_disjoint_leading_directions_and_root_t_for_a_shared_one():
    t, m, n = 4, 12, 8
    pre = _state(torch.zeros(m, n))
    eye_m, eye_n = torch.eye(m), torch.eye(n)
    disjoint = [_state(torch.outer(eye_m[i], eye_n[i])) for i in range(t)]  # orthogonal rank-one task matrices
    assert spectral_accumulation(pre, disjoint)["mlp.c_fc"] == pytest.approx(1 / math.sqrt(t))
    shared = [_state(torch.outer(eye_m[0], eye_n[0])) for _ in range(t)]  # the same leading direction in every task
    assert spectral_accumulation(pre, shared)["mlp.c_fc"] == pytest.approx(math.sqrt(t))


class _Tower(nn.Module):
    """The smallest image tower finetune() accepts: a trainable layer and a frozen projection."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3 * 32 * 32, 4)
        self.proj = nn.Parameter(torch.eye(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1)) @ self.proj


def _recorded_finetune(count: int, recipe: dict) -> tuple[_Tower, torch.Tensor, list[dict]]:
    """finetune() of a _Tower on ``count`` random images, with AdamW's settings at every step it took."""
    torch.manual_seed(0)
    tower = _Tower()
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8)
    labels = np.arange(count) % 2
    head = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    proj = tower.proj.detach().clone()
    settings = []
    optimiser_step = torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        settings.append({key: self.param_groups[0][key] for key in ("lr", "weight_decay")})
        return optimiser_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", recorded)
        finetune(tower, head, 20.0, images, labels, recipe, seed=0)
    return tower, proj, settings


def test_finetune_takes_exactly_the_steps_asked_for_leaves_the_projection_and_keeps_a_constant_rate():
    recipe = parse_recipe("lr=1e-3,schedule=constant,batch=4,steps=7,wd_per_step=0")
    tower, proj, settings = _recorded_finetune(10, recipe)
    # 2.5 batches per pass over the 10 images: the loop stops mid-pass
    assert [step["lr"] for step in settings] == [1e-3] * 7
    assert torch.equal(tower.proj, proj)


def test_finetune_by_epochs_runs_one_cycle_over_whole_epochs_with_the_decay_asked_for():
    recipe = build.parse_recipe("schedule=onecycle,epochs=2,steps=0,batch=128,wd_per_step=1e-6")
    _, _, settings = _recorded_finetune(300, recipe)
    steps = 2 * math.ceil(300 / 128)
    reference = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=build.FINETUNE_LR)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(reference, build.FINETUNE_LR, total_steps=steps, pct_start=0.1)
    expected = []
    for _ in range(steps):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        one_cycle.step()
    assert [step["lr"] for step in settings] == expected
    assert [step["weight_decay"] for step in settings] == pytest.approx([1e-6 / build.FINETUNE_LR] * steps)


def test_finetune_with_the_default_recipe_takes_its_steps_at_a_constant_rate_without_decay():
    recipe = build.parse_recipe("steps=5")  # the default, shortened
    _, _, settings = _recorded_finetune(300, recipe)
    assert settings == [{"lr": build.FINETUNE_LR, "weight_decay": 0.0}] * 5


def test_upsampling_from_low_resolution_keeps_the_shape_and_loses_only_fine_detail():
    rows = torch.arange(32).view(1, 1, 32, 1).expand(2, 3, 32, 32)
    checker = ((rows + rows.transpose(2, 3)) % 2 * 255).to(torch.uint8)  # the finest detail there is
    ramp = (rows * 8).to(torch.uint8)  # coarse: a slow gradient
    assert torch.equal(upsampled(checker, 32), checker)  # captured at full size: unchanged
    blurred = upsampled(checker, 16)
    assert blurred.shape == checker.shape and blurred.dtype == torch.uint8
    assert blurred.float().std() < 5 < checker.float().std()  # the checkerboard averages out to grey
    assert (upsampled(ramp, 16).float() - ramp.float()).abs()[..., 2:-2, :].max() <= 8  # the gradient stays


class _RecordingBench:
    """Stands in for the bench: remembers every state it is asked about and scores it with ``score``."""

    def __init__(self, score):
        self.score, self.states = score, []

    def accuracies(self, state):
        self.states.append({k: v.clone() for k, v in state.items()})
        return {"task": self.score(state)}


def _orthogonal_tasks(t: int, m: int = 12, n: int = 8, other: float = 1.0):
    eye_m, eye_n = torch.eye(m), torch.eye(n)
    pre = _state(torch.zeros(m, n))
    tasks = []
    for i in range(t):
        task = _state(torch.outer(eye_m[i], eye_n[i]) * (i + 1))
        task[BLOCK + "ln_1.weight"] = pre[BLOCK + "ln_1.weight"] + other * eye_n[i]
        tasks.append(task)
    return pre, tasks


def test_scale_only_is_the_task_vectors_sum_rescaled_to_their_mean_norm_as_opcm_rescales():
    pre, tasks = _orthogonal_tasks(4)
    bench = _RecordingBench(lambda state: 0.5)
    result = scale_only(bench, pre, tasks, normalised=lambda acc: 2 * acc)
    norms = [math.sqrt((i + 1) ** 2 + 1) for i in range(4)]
    total = math.sqrt(sum(n * n for n in norms))  # orthogonal task vectors: the sum's norm adds in squares
    assert result["coefficient"] == pytest.approx(np.mean(norms) / total)
    (state,) = bench.states
    summed = sum(task[BLOCK + "mlp.c_fc.weight"] for task in tasks)
    assert torch.allclose(state[BLOCK + "mlp.c_fc.weight"], result["coefficient"] * summed)
    assert result["acc"] == 0.5 and result["normalised"] == 1.0


def test_isotropic_flattens_every_matrix_of_the_sum_to_its_mean_singular_value_and_keeps_the_best_scale():
    pre, tasks = _orthogonal_tasks(4)
    # the sum's spectrum: the four tasks' scales and four zeros (8 = the smaller side); Iso-C takes the
    # mean over all of them and spreads it over every direction, as its authors' code does
    mean_singular = sum([1, 2, 3, 4]) / 8

    def closeness_to_unit_scale(state):  # the best score where the flat spectrum is exactly the mean (α = 1)
        top = torch.linalg.matrix_norm(state[BLOCK + "mlp.c_fc.weight"], ord=2)
        return -abs(float(top) - mean_singular)

    bench = _RecordingBench(closeness_to_unit_scale)
    result = isotropic(bench, pre, tasks, normalised=lambda acc: acc)
    assert result["alpha"] == 1.0 and len(bench.states) == len(ISOTROPIC_SCALES)
    coefficient = scale_only(_RecordingBench(lambda s: 0.0), pre, tasks, normalised=lambda a: a)["coefficient"]
    for alpha, state in zip(ISOTROPIC_SCALES, bench.states, strict=True):
        singular = torch.linalg.svdvals(state[BLOCK + "mlp.c_fc.weight"])
        assert torch.allclose(singular, torch.full((8,), alpha * mean_singular))  # flat
        # the other parameters are summed at the scale-only coefficient, untouched by the flattening
        assert torch.allclose(state[BLOCK + "ln_1.weight"], 1 + coefficient * torch.tensor([1.0] * 4 + [0.0] * 4))


def test_the_stored_base_has_a_half_precision_text_tower_whose_heads_are_the_ones_fine_tunes_trained_against(tmp_path):
    from safetensors.torch import load_file, save_file

    from scripts.minibench.generators import TASKS

    model, tokenizer = build.create_model(tmp_path / "base", build.model_config(width=32, layers=1))
    visual_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    stored = build.round_text_tower(model, torch.float16)
    save_file(stored, str(tmp_path / "base" / "open_clip_model.safetensors"))

    assert stored["token_embedding.weight"].dtype == torch.float16
    assert stored["text_projection"].dtype == torch.float16
    assert stored["logit_scale"].dtype == torch.float32
    assert all(stored[f"visual.{k}"].dtype == torch.float32 for k in visual_before)
    assert all(torch.equal(stored[f"visual.{k}"], v) for k, v in visual_before.items())  # θ0 exact
    # the heads the build computes after rounding are those a loader of the stored file computes
    loaded, _ = build.create_model(tmp_path / "loaded", build.model_config(width=32, layers=1))
    loaded.load_state_dict(load_file(str(tmp_path / "base" / "open_clip_model.safetensors")))
    assert torch.equal(
        build.zeroshot_head(model, tokenizer, TASKS[0]), build.zeroshot_head(loaded, tokenizer, TASKS[0])
    )
    # rounding is idempotent, so rebuilding on a stored base (--reuse-base) stores the same file
    again = build.round_text_tower(loaded, torch.float16)
    assert all(torch.equal(again[k], v) for k, v in stored.items())
    # float32 (what ships until the next rebuild) stores the model as it is
    unrounded = {k: v.clone() for k, v in loaded.state_dict().items()}
    kept = build.round_text_tower(loaded, torch.float32)
    assert all(kept[k].dtype == torch.float32 and torch.equal(kept[k], v) for k, v in unrounded.items())


def test_the_report_refuses_a_benchmark_the_library_would_not_load(tmp_path):
    from scripts.minibench.report import SHIPPED, require_shipped_location

    require_shipped_location(SHIPPED)
    with pytest.raises(SystemExit, match="--no-report"):
        require_shipped_location(tmp_path)


def _write_record(folder, recipe, seconds=123.0):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / build.PRETRAINING_RECORD).write_text(json.dumps({"recipe": recipe, "seconds": seconds}))


def test_a_reused_base_must_have_been_pretrained_with_the_recipe_asked_for_naming_what_differs(tmp_path):
    import json

    wanted = build.pretraining_recipe(0, 60, 0.3, 192, 2, 3000, 0.2)
    lab_base = tmp_path / "lab-base"
    _write_record(lab_base, {**wanted, "text_tower_dtype": "float16"}, seconds=2534)
    assert build.reused_base(tmp_path / "out", lab_base, wanted, torch.float16) == (lab_base, 2534)
    # a float16 text tower cannot be widened back: a float32 build must pretrain afresh
    with pytest.raises(SystemExit, match="text tower stored in float16"):
        build.reused_base(tmp_path / "out", lab_base, wanted, torch.float32)
    # the task style is part of the recipe: a base drawn with another style does not pass
    with pytest.raises(SystemExit, match=r"task_style 0.2 \(asked 0.3\)"):
        build.reused_base(tmp_path / "out", lab_base, {**wanted, "task_style": 0.3}, torch.float16)
    # the previous build's report: a setting it did not record takes the value builds then used
    out = tmp_path / "out"
    out.mkdir()
    old = {k: v for k, v in wanted.items() if k not in ("task_style", "pretrain_images_per_task")}
    (out / "build_report.json").write_text(json.dumps({"recipe": old, "seconds": {"pretrain": 99.0}}))
    assert build.reused_base(out, True, {**wanted, "task_style": 0.3}, torch.float32) == (out / "base", 99.0)
    with pytest.raises(SystemExit, match=r"task_style 0.3 \(asked 0.2\)"):
        build.reused_base(out, True, wanted, torch.float16)


def test_parallel_fine_tunes_give_the_weights_of_one_thread_fine_tunes_one_after_another():
    # the build fine-tunes its tasks in forked one-thread workers: the weights must not depend on how many
    torch.manual_seed(0)
    tower = _Tower()
    names = [build.TASKS[i].name for i in (0, 3, 5)]
    data = {name: (torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8), np.arange(24) % 2) for name in names}
    heads = {name: torch.nn.functional.normalize(torch.randn(2, 4), dim=-1) for name in names}
    recipe = parse_recipe("lr=1e-3,schedule=constant,batch=8,steps=6,wd_per_step=0")

    def run(workers: int) -> dict[int, tuple[float, dict]]:
        done = build.finetune_tasks(tower, heads, 20.0, data, data, recipe, 7, workers)
        return {index: (acc, state) for index, acc, state in done}

    threads = torch.get_num_threads()
    alone, side_by_side = run(1), run(2)
    assert sorted(alone) == sorted(side_by_side) == [0, 3, 5]
    for index, (acc, state) in alone.items():
        assert side_by_side[index][0] == acc
        assert state.keys() == {"body.weight", "body.bias"}  # the projection is not the task's
        assert all(torch.equal(state[k], side_by_side[index][1][k]) for k in state)
        assert not torch.equal(state["body.weight"], tower.body.weight)  # each trained a copy, not the tower
    assert torch.get_num_threads() == threads and build._FINETUNE_JOB == {}  # nothing left behind


def test_other_concepts_are_distinct_seeded_and_drawn_alike_however_the_workers_share_them():
    from scripts.minibench.concepts import CAPTIONS, concepts, draw_corpus

    defined = concepts(40, seed=0)
    names = [c.name for c in defined]
    assert len(set(names)) == 40 and concepts(40, seed=0) == defined and concepts(40, seed=1) != defined
    task_classes = {name.lower() for spec in build.TASKS for name in spec.classnames}
    assert not task_classes & set(names)  # never a task's class
    alone = draw_corpus(4, 3, seed=0, noise=0.0)
    halves = [draw_corpus(4, 3, seed=0, noise=0.0, chunk=(k, 2)) for k in range(2)]
    by_concept = {}
    for images, captions in halves:
        for image, caption in zip(images, captions, strict=True):
            by_concept.setdefault(caption.split()[-1], []).append(np.asarray(image))
    assert sum(len(v) for v in by_concept.values()) == 12
    for image, caption in zip(*alone, strict=True):  # without caption noise every caption names its concept
        assert any(np.array_equal(np.asarray(image), other) for other in by_concept[caption.split()[-1]])
    assert {caption.split()[-1].rstrip(".") for caption in alone[1]} == set(names[:4])
    assert all(any(c == t.format(c.split()[-1].rstrip(".")) for t in CAPTIONS) for c in alone[1])
    # two images of one concept differ: pose, colours and background are drawn anew
    assert not np.array_equal(np.asarray(alone[0][0]), np.asarray(alone[0][1]))
    noisy = draw_corpus(4, 3, seed=0, noise=1.0)[1]
    assert noisy != alone[1]  # every caption names a concept drawn at random


def test_the_pretraining_recipe_records_the_other_concepts_and_an_old_record_implies_none(tmp_path):
    wanted = build.pretraining_recipe(0, 60, 0.3, 192, 2, 3000, 0.3, other_concepts=120, other_images=100)
    assert wanted["other_concepts"] == 120 and wanted["other_images_per_concept"] == 100
    assert build.pretraining_recipe(0, 60, 0.3, 192, 2, 3000, 0.3, 0, 100)["other_images_per_concept"] == 0
    old = {k: v for k, v in wanted.items() if not k.startswith("other")}
    _write_record(tmp_path / "old", {**old, "text_tower_dtype": "float16"})
    none = build.pretraining_recipe(0, 60, 0.3, 192, 2, 3000, 0.3)
    assert build.reused_base(tmp_path, tmp_path / "old", none, torch.float16)[0] == tmp_path / "old"
    with pytest.raises(SystemExit, match=r"other_concepts 0 \(asked 120\)"):
        build.reused_base(tmp_path, tmp_path / "old", wanted, torch.float16)


class _PredictingBench:
    """Predicts round(x · w / 0.3) for each task's inputs x, with w the state's one vector."""

    def __init__(self, inputs):
        self.inputs = inputs

    def predictions(self, state, tasks):
        return {t: torch.round(self.inputs[t] @ state["w"] / 0.3).numpy() for t in tasks}


def test_the_disentanglement_error_is_zero_for_vectors_acting_on_their_own_inputs_only_and_two_when_on_all():
    from scripts.minibench.lab import disentanglement_error

    pre = {"w": torch.zeros(3)}
    models = {t: {"w": torch.eye(3)[i]} for i, t in enumerate("abc")}
    own = {t: torch.eye(3)[i].repeat(5, 1) for i, t in enumerate("abc")}  # task t's inputs see only coordinate t
    assert disentanglement_error(_PredictingBench(own), pre, models) == 0.0
    shared = dict.fromkeys("abc", torch.ones(5, 3))  # every vector moves every input: all predictions change
    assert disentanglement_error(_PredictingBench(shared), pre, models) == 2.0


class _LinearTower(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        block = nn.Module()
        block.mlp = nn.Sequential()
        block.mlp.add_module("c_fc", nn.Linear(width, width, bias=False))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([block])

    def forward(self, x):
        return self.transformer.resblocks[0].mlp(x)


def test_cross_action_is_zero_for_task_matrices_on_disjoint_inputs_and_about_one_for_shared_inputs():
    from types import SimpleNamespace

    from scripts.minibench.lab import cross_action

    torch.manual_seed(0)
    tower = _LinearTower()
    pre = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    key = BLOCK + "mlp.c_fc.weight"
    halves = (torch.arange(6) < 3).float(), (torch.arange(6) >= 3).float()
    # each task's inputs live on its half of the coordinates, and its matrix reads only that half
    inputs = {t: torch.randn(40, 6) * half for t, half in zip("ab", halves, strict=True)}
    models = {t: {key: pre[key] + torch.randn(6, 6) * half} for t, half in zip("ab", halves, strict=True)}
    bench = SimpleNamespace(model=SimpleNamespace(visual=tower), inputs=inputs)
    assert cross_action(bench, pre, models) == {"mlp.c_fc": 0.0}
    bench.inputs = {t: torch.randn(400, 6) for t in "ab"}  # inputs of one distribution
    assert cross_action(bench, pre, models, images=400)["mlp.c_fc"] == pytest.approx(1.0, abs=0.15)
