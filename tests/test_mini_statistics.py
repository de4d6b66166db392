"""The mini benchmark's task-vector statistics, on small matrices whose answers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from merging.evaluation.backbones import load_backbone
from merging.evaluation.evaluator import Evaluator
from merging.experiment.runner import ContinualRun, RunConfig, preset_checkpoints
from merging.families.clip_vit.matrices import matrix_views
from merging.methods import METHODS
from scripts.minibench import build
from scripts.minibench.report import (
    ORDERS_VARIABLE,
    OTMF_VARIANTS,
    OrderRuns,
    Series,
    _recipe_lines,
    checks,
    compare,
    order_seeds,
    real_results,
)
from scripts.minibench.statistics import (
    ALL_MATRICES,
    MARCZAK_COSINE,
    MARCZAK_SAR,
    MARCZAK_TASKS,
    PUBLISHED,
    alignment_ratio,
    energy_rank,
    layer_type,
    leading_singular_vectors,
    matrix_statistics,
    mean_pairwise_overlap,
    pairwise_cosine_summary,
    random_overlap,
    relative_norm,
    stable_rank,
    subspace_overlap,
    task_vector_statistics,
)


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def with_spectrum(left: torch.Tensor, values: list[float], right: torch.Tensor) -> torch.Tensor:
    return left @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ right.T


def test_layer_types_of_clip_labels():
    block = "transformer.resblocks.3."
    assert [layer_type(block + f"attn.in_proj_weight[{p}]") for p in "qkv"] == ["attn.q", "attn.k", "attn.v"]
    assert layer_type(block + "attn.out_proj.weight") == "attn.out"
    assert layer_type(block + "mlp.c_fc.weight") == "mlp.c_fc"
    assert layer_type(block + "mlp.c_proj.weight") == "mlp.c_proj"
    assert layer_type("layers.2.weight") == "layers.2"  # another family: the label's tail


def test_relative_norm():
    base = torch.eye(4) * 2.0  # ‖θ0‖_F = 4
    assert relative_norm(base * 0.1, base) == pytest.approx(0.1)
    assert relative_norm(torch.ones(4, 4), base) == pytest.approx(1.0)
    assert math.isnan(relative_norm(torch.ones(2, 2), torch.zeros(2, 2)))


def test_stable_rank_counts_the_directions_that_carry_the_energy():
    u, v = orthonormal(12, 3, 0), orthonormal(7, 3, 1)
    assert stable_rank(with_spectrum(u[:, :1], [5.0], v[:, :1])) == pytest.approx(1.0)  # rank one
    assert stable_rank(with_spectrum(u, [2.0, 2.0, 2.0], v)) == pytest.approx(3.0)  # flat spectrum: the rank
    assert stable_rank(with_spectrum(u, [2.0, 1.0, 1.0], v)) == pytest.approx(6.0 / 4.0)
    assert stable_rank(torch.eye(5)) == pytest.approx(5.0)
    assert stable_rank(torch.zeros(3, 3)) == 0.0


def test_subspace_overlap_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    q = orthonormal(10, 6, 2)
    a, b = q[:, :3], q[:, 3:]
    assert subspace_overlap(a, a) == pytest.approx(1.0)
    rotation = orthonormal(3, 3, 3)
    assert subspace_overlap(a, a @ rotation) == pytest.approx(1.0)  # another basis of the same subspace
    assert subspace_overlap(a, -a) == pytest.approx(1.0)  # signs do not matter
    assert subspace_overlap(a, b) == pytest.approx(0.0, abs=1e-12)
    half = torch.cat([a[:, :1], b[:, :1]], dim=1)  # shares one of two directions with span(a[:, :2])
    assert subspace_overlap(a[:, :2], half) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        subspace_overlap(a, q)


def test_leading_singular_vectors_recover_a_planted_subspace():
    u, v = orthonormal(20, 5, 4), orthonormal(9, 5, 5)
    matrix = with_spectrum(u, [9.0, 7.0, 5.0, 0.2, 0.1], v)
    left, right = leading_singular_vectors(matrix, 3)
    assert left.shape == (20, 3) and right.shape == (9, 3)
    assert subspace_overlap(left, u[:, :3]) == pytest.approx(1.0)
    assert subspace_overlap(right, v[:, :3]) == pytest.approx(1.0)
    assert leading_singular_vectors(matrix, 50)[0].shape == (20, 9)  # k capped at the smaller side


def test_mean_pairwise_overlap_and_the_random_baseline():
    q = orthonormal(30, 12, 6)
    same = [q[:, :4]] * 3
    disjoint = [q[:, :4], q[:, 4:8], q[:, 8:12]]
    assert mean_pairwise_overlap(same) == pytest.approx(1.0)
    assert mean_pairwise_overlap(disjoint) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_overlap(disjoint[:1] + same[:1]) == pytest.approx(1.0)  # one pair, not the mean of 3
    assert random_overlap(8, 96) == pytest.approx(8 / 96)
    assert random_overlap(8, 4) == 1.0
    # random subspaces of R^200 overlap k/d on average
    draws = [subspace_overlap(orthonormal(200, 10, s), orthonormal(200, 10, s + 1000)) for s in range(40)]
    assert sum(draws) / len(draws) == pytest.approx(random_overlap(10, 200), rel=0.15)


def test_energy_rank_and_alignment_ratio():
    assert energy_rank(torch.tensor([3.0, 4.0, 0.0])) == 2
    assert energy_rank(torch.tensor([10.0, 0.1, 0.1])) == 1  # tail energy 0.02 / 100.02 ≤ 0.05²
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 4
    assert energy_rank(torch.zeros(3)) == 0
    q = orthonormal(8, 4, 7)
    inside = with_spectrum(q[:, :2], [3.0, 1.0], orthonormal(5, 2, 8))
    outside = with_spectrum(q[:, 2:], [2.0, 2.0], orthonormal(5, 2, 9))
    assert alignment_ratio(inside, q[:, :2]) == pytest.approx(1.0)
    assert alignment_ratio(outside, q[:, :2]) == pytest.approx(0.0, abs=1e-12)
    # half of the energy inside: ‖Π A‖ / ‖A‖ = √½
    mixed = with_spectrum(q[:, [0, 2]], [1.0, 1.0], orthonormal(5, 2, 10))
    assert alignment_ratio(mixed, q[:, :2]) == pytest.approx(math.sqrt(0.5))


def test_matrix_statistics_tell_shared_from_orthogonal_task_subspaces():
    torch.manual_seed(0)
    base = torch.randn(16, 12, dtype=torch.float64)
    q_left, q_right = orthonormal(16, 9, 11), orthonormal(12, 9, 12)
    shared = [with_spectrum(q_left[:, :3], [3.0, 2.0, 1.0 + t], q_right[:, :3]) for t in range(3)]
    separate = [
        with_spectrum(q_left[:, 3 * t : 3 * t + 3], [3.0, 2.0, 1.0], q_right[:, 3 * t : 3 * t + 3]) for t in range(3)
    ]
    same = matrix_statistics("transformer.resblocks.0.mlp.c_fc.weight", base, shared, k=3)
    apart = matrix_statistics("transformer.resblocks.0.mlp.c_fc.weight", base, separate, k=3)
    assert same.layer_type == "mlp.c_fc" and same.shape == (16, 12) and same.k == 3
    assert same.overlap_left == pytest.approx(1.0) and same.overlap_right == pytest.approx(1.0)
    assert apart.overlap_left == pytest.approx(0.0, abs=1e-12) and apart.overlap_right == pytest.approx(0.0, abs=1e-12)
    assert same.sar_pairwise == pytest.approx(1.0) and apart.sar_pairwise == pytest.approx(0.0, abs=1e-12)
    assert apart.k_merged == 9 and all(v == pytest.approx(1.0) for v in apart.sar_merged)
    assert apart.stable_rank == pytest.approx([14 / 9] * 3)
    norm = math.sqrt(14) / float(torch.linalg.matrix_norm(base))
    assert apart.relative_norm == pytest.approx([norm] * 3)


def clip_like(blocks: int = 2, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"conv1.weight": torch.randn(d, 3, 2, 2, generator=g), "ln_post.weight": torch.ones(d)}
    for b in range(blocks):
        p = f"transformer.resblocks.{b}."
        state[p + "attn.in_proj_weight"] = torch.randn(3 * d, d, generator=g)
        state[p + "attn.out_proj.weight"] = torch.randn(d, d, generator=g)
        state[p + "mlp.c_fc.weight"] = torch.randn(4 * d, d, generator=g)
        state[p + "mlp.c_proj.weight"] = torch.randn(d, 4 * d, generator=g)
    return state


def test_task_vector_statistics_per_layer_type_on_a_clip_like_state():
    pretrained = clip_like()
    d = 8
    one = {k: v.clone() for k, v in pretrained.items()}
    two = {k: v.clone() for k, v in pretrained.items()}
    u = orthonormal(4 * d, 2, 20).float()
    for b in range(2):
        key = f"transformer.resblocks.{b}.mlp.c_fc.weight"
        one[key] += 0.1 * u[:, :1] @ torch.ones(1, d)  # rank one, different left directions
        two[key] += 0.1 * u[:, 1:] @ torch.ones(1, d)
        qkv = f"transformer.resblocks.{b}.attn.in_proj_weight"
        one[qkv][:d] += 0.05 * torch.eye(d)  # only q moves, identically in both tasks
        two[qkv][:d] += 0.05 * torch.eye(d)
    one["ln_post.weight"] += 1.0
    two["ln_post.weight"] -= 1.0
    stats = task_vector_statistics(pretrained, [one, two], tasks=["a", "b"], k=1, matrix_views=matrix_views)
    assert list(stats.per_type) == ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.c_fc", "mlp.c_proj", ALL_MATRICES]
    fc, q = stats.per_type["mlp.c_fc"], stats.per_type["attn.q"]
    assert fc.matrices == 2 and fc.shape == (4 * d, d) and stats.per_type[ALL_MATRICES].matrices == 12
    assert fc.stable_rank == pytest.approx(1.0) and fc.overlap_left == pytest.approx(0.0, abs=1e-6)
    assert fc.overlap_right == pytest.approx(1.0)  # both rows are ones: the same right direction
    assert fc.random_left == pytest.approx(1 / 32) and fc.random_right == pytest.approx(1 / 8)
    assert q.stable_rank == pytest.approx(d) and q.overlap_left == pytest.approx(1.0)
    assert stats.per_type["attn.k"].relative_norm == 0.0 and stats.per_type["attn.k"].stable_rank == 0.0
    # whole task vectors: the opposite layer-norm shifts dominate, so the cosine is negative but |cos| < 1
    assert 0.0 < stats.cosine_mean_abs == stats.cosine_max_abs < 1.0
    data = stats.to_json()
    assert data["tasks"] == ["a", "b"] and data["per_type"]["mlp.c_fc"]["matrices"] == 2
    with pytest.raises(ValueError):
        task_vector_statistics(pretrained, [one], matrix_views=matrix_views)


def test_pairwise_cosine_summary_ignores_the_diagonal_and_signs():
    assert pairwise_cosine_summary([[1.0, -0.2], [-0.2, 1.0]]) == pytest.approx((0.2, 0.2))
    assert pairwise_cosine_summary(torch.tensor([[1.0, 0.1, 0.3], [0.1, 1.0, 0.2], [0.3, 0.2, 1.0]])) == (
        pytest.approx(0.2),
        pytest.approx(0.3),
    )


def test_published_values_are_what_the_papers_show():
    assert len(MARCZAK_COSINE) == len(MARCZAK_SAR) == len(MARCZAK_TASKS) == 8
    assert all(MARCZAK_COSINE[i][j] == MARCZAK_COSINE[j][i] for i in range(8) for j in range(8))
    published = {p.statistic: p for p in PUBLISHED}
    assert published["cosine_mean_abs"].value == pytest.approx(1.27 / 28)
    assert published["cosine_max_abs"].value == pytest.approx(0.19)
    assert 0.54 <= published["sar_pairwise"].value <= 0.75
    for name in ("relative_norm", "stable_rank", "overlap_left", "sar_merged"):
        assert published[name].value is None and published[name].source
    assert all(p.text and p.source for p in PUBLISHED)


# ---------------------------------------------------------------- the report built on them


def synthetic_runs(magmax: list[float]) -> OrderRuns:
    """Two orders of mini-8 with chosen ACCs: zero-shot 50 %, fine-tuned 90 % on every task."""
    tasks = [f"t{i}" for i in range(8)]
    chosen = {"opcm": [76.0, 78.0], "task_arithmetic": [69.0, 70.0], "weight_average": [70.0, 70.0], "magmax": magmax}
    methods = {
        name: Series(acc=chosen.get(name, [60.0, 60.0]), bwt=[-5.0, -7.0]) for name in METHODS
    }  # the registry: every method has a row
    return OrderRuns(
        preset="mini-8",
        seeds=(42, 43),
        methods=methods,
        otmf={name: Series(acc=[60.0, 61.0], bwt=[-1.0, -2.0]) for name in OTMF_VARIANTS},
        reference={"pretrained": dict.fromkeys(tasks, 0.5), "finetuned": dict.fromkeys(tasks, 0.9)},
        head_tuning={},
        seconds=[1.0, 1.0],
    )


def test_comparison_with_the_real_benchmark():
    real = real_results()
    data = compare(synthetic_runs(magmax=[71.0, 73.0]), real)
    assert data["pretrained_mean"] == pytest.approx(50.0) and data["finetuned_mean"] == pytest.approx(90.0)
    opcm = data["methods"]["opcm"]
    assert opcm["acc_mean"] == pytest.approx(77.0) and opcm["acc_std"] == pytest.approx(math.sqrt(2))
    assert opcm["normalised"] == pytest.approx(27 / 40)
    assert opcm["real_acc"] == 75.5 and opcm["real_normalised"] == pytest.approx((75.5 - 48.1) / (90.4 - 48.1))
    ta = data["methods"]["task_arithmetic"]
    assert ta["published_name"] == "continual_task_arithmetic" and ta["real_acc"] == 67.5
    assert data["methods"]["otmf"]["real_acc"] is None  # OTMF is not in the published table
    assert data["gap"]["mini"] == pytest.approx(77.0 - 72.0) and data["gap"]["mini_best_baseline"] == "magmax"
    assert data["gap"]["mini_per_order"] == pytest.approx([5.0, 5.0])
    assert data["gap"]["real"] == pytest.approx(75.5 - 70.7) and data["gap"]["real_best_baseline"] == "magmax"
    reference12 = {"finetuned": dict.fromkeys(range(12), 0.95)}
    passed = checks({"mini-8": data}, reference12)
    assert all(passed.values()), passed
    # OPCM only 2 points ahead of MagMax: the gap goal fails and says so
    worse = checks({"mini-8": compare(synthetic_runs(magmax=[75.0, 75.0]), real)}, reference12)
    assert [name for name, ok in worse.items() if not ok] == [
        "goal (mini-8): OPCM beats the best of C-TA/WA/MagMax by >= 3 points"
    ]
    weak = checks({"mini-8": data}, {"finetuned": {**reference12["finetuned"], 11: 0.89}})
    assert not weak["every fine-tuned model >= 90% on its own task (all 12 tasks)"]


def test_order_seeds_are_the_papers(monkeypatch):
    monkeypatch.delenv(ORDERS_VARIABLE, raising=False)
    assert order_seeds() == tuple(range(42, 52))
    assert order_seeds(3) == (42, 43, 44)
    monkeypatch.setenv(ORDERS_VARIABLE, "2")  # the build's --report-only honours it
    assert order_seeds() == (42, 43)
    with pytest.raises(ValueError):
        order_seeds(11)


def test_otmf_default_equals_the_zero_shot_heads_of_a_head_tuning_run(tmp_path):
    """The report reads default OTMF from a head-tuning run's zero-shot-head column: they must be equal."""
    checkpoints = preset_checkpoints("mini-8")[:3]
    evaluator = Evaluator(load_backbone("mini"), "cpu", samples=48, cache_dir=tmp_path)
    quick = {"steps": 4, "batch_size": 8, "head_steps": 10}
    runs = {}
    for name, extra in (("default", {}), ("tuned", {"head_tuning": "on"})):
        config = RunConfig(checkpoints=checkpoints, methods={"otmf": {**quick, **extra}}, samples=48, device="cpu")
        runs[name] = ContinualRun(config, evaluator, cache_dir=tmp_path).run().methods["otmf"]
    default, tuned = runs["default"], runs["tuned"]
    assert not default.has_zeroshot_heads and tuned.has_zeroshot_heads
    assert tuned.matrix(zeroshot_heads=True) == default.matrix()
    assert tuned.acc_zeroshot_head == default.acc and tuned.bwt_zeroshot_head == default.bwt
    assert tuned.matrix() != default.matrix()  # the tuned heads do change what is measured


ROOT = Path(__file__).resolve().parents[1]


def test_the_report_describes_the_recipe_the_shipped_build_records_and_lists_an_unrecorded_one():
    config = json.loads((ROOT / "assets" / "mini" / "base" / "open_clip_config.json").read_text())["model_cfg"]
    shipped = json.loads((ROOT / "assets" / "mini" / "build_report.json").read_text())
    line = _recipe_lines(shipped, config)[1]
    words = build.describe_recipe(shipped["recipe"]["finetune"])
    assert f"({words}, over 10,000 freshly drawn images)" in line
    onecycle = build.parse_recipe("schedule=onecycle,epochs=10,steps=0,batch=128,wd_per_step=1e-6")
    line = _recipe_lines({**shipped, "recipe": {**shipped["recipe"], "finetune": onecycle}}, config)[1]
    assert "(AdamW, one-cycle lr 0.0002, 10 epochs in batches of 128, weight decay 0.005" in line
    unrecorded = {key: value for key, value in shipped["recipe"].items() if key != "finetune"}
    line = _recipe_lines({**shipped, "recipe": unrecorded}, config)[1]
    assert "Recipe: " in line and f"pretrain_epochs {unrecorded['pretrain_epochs']}" in line


def test_the_report_says_how_large_the_corpus_was_and_how_the_text_tower_is_stored_when_the_build_records_it():
    config = json.loads((ROOT / "assets" / "mini" / "base" / "open_clip_config.json").read_text())["model_cfg"]
    shipped = json.loads((ROOT / "assets" / "mini" / "build_report.json").read_text())
    older = {
        key: value
        for key, value in shipped["recipe"].items()
        if key not in ("pretrain_images_per_task", "text_tower_dtype")
    }
    line = _recipe_lines({**shipped, "recipe": older}, config)[0]
    assert "images per concept" not in line and "text tower is stored" not in line
    recorded = {**older, "pretrain_images_per_task": 6000, "text_tower_dtype": "float16"}
    line = _recipe_lines({**shipped, "recipe": recorded}, config)[0]
    assert "over 6,000 images per concept; its text tower is stored in float16" in line
    assert "other concepts" not in line
    others = {**recorded, "other_concepts": 120, "other_images_per_concept": 100}
    line = _recipe_lines({**shipped, "recipe": others}, config)[0]
    assert "over 6,000 images per concept, and 100 images of each of 120 other concepts no task asks about" in line
