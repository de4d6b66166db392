"""The continual runner end to end on the embedded mini benchmark."""

from __future__ import annotations

import json

import pytest

from merging.cli.main import main
from merging.errors import MergingError
from merging.evaluation.evaluator import Evaluator
from merging.evaluation.tasks import registry
from merging.experiment.metrics import acc, bwt
from merging.experiment.runner import (
    CheckpointSpec,
    ContinualRun,
    RunConfig,
    infer_task,
    parse_checkpoint,
    preset_checkpoints,
    shuffled,
)
from merging.methods import METHODS

SAMPLES = 64


@pytest.fixture(scope="module")
def mini_three():
    return preset_checkpoints("mini-8")[:3]


def config_for(checkpoints, methods=None, **kwargs):
    return RunConfig(checkpoints=checkpoints, methods=methods or {"opcm": {}}, samples=SAMPLES, device="cpu", **kwargs)


def matrix_of(results, method):
    names = results["tasks"]
    columns = results["methods"][method]["accuracy"]
    return [[column.get(name) for column in columns] for name in names]


def test_every_method_end_to_end(tmp_path, mini_three):
    quick = {"otmf": {"steps": 10}, "task_arithmetic": {"scaling": 0.3}}
    methods = {name: quick.get(name, {}) for name in METHODS}  # the registry: a new method runs here too
    run = ContinualRun(config_for(mini_three, methods), cache_dir=tmp_path)
    reports = list(run.steps())
    assert [r.step for r in reports] == [1, 2, 3] and [r.task for r in reports] == [c.task for c in mini_three]
    results = run.results().to_json()
    assert results["tasks"] == [c.task for c in mini_three] and results["completed_steps"] == 3
    assert set(results["reference"]) == {"pretrained", "finetuned"}
    for name in methods:
        data = results["methods"][name]
        assert [sorted(step) for step in data["accuracy"]] == [sorted(results["tasks"][: t + 1]) for t in range(3)]
        assert all(0.0 <= a <= 1.0 for step in data["accuracy"] for a in step.values())
        matrix = matrix_of(results, name)
        assert data["acc"] == pytest.approx(acc(matrix)) and data["bwt"] == pytest.approx(bwt(matrix))
        assert data["bwt_per_step"][0] is None and len(data["steps"]) == 3
        assert data["steps"][-1]["merge_seconds"] > 0 and "merged_norm" in data["steps"][-1]["diagnostics"]
    assert "lambda" in results["methods"]["opcm"]["steps"][-1]["diagnostics"]
    # the first step of every method but task arithmetic/TIES/MagMax is the fine-tuned model itself
    first = mini_three[0].task
    for name in ("opcm", "otmf", "weight_average"):
        first_step = results["methods"][name]["accuracy"][0][first]
        assert first_step == pytest.approx(results["reference"]["finetuned"][first])


def test_eval_all_evaluates_unseen_tasks_too(tmp_path, mini_three):
    run = ContinualRun(config_for(mini_three, eval="all"), cache_dir=tmp_path)
    results = run.run().to_json()
    assert all(sorted(step) == sorted(results["tasks"]) for step in results["methods"]["opcm"]["accuracy"])
    matrix = matrix_of(results, "opcm")
    assert results["methods"]["opcm"]["acc_per_step"][0] == pytest.approx(matrix[0][0])


def test_stopping_keeps_completed_steps(tmp_path, mini_three):
    run = ContinualRun(config_for(mini_three), cache_dir=tmp_path)
    for report in run.steps():
        if report.step == 2:
            break
    results = run.results().to_json()
    assert results["completed_steps"] == 2 and len(results["methods"]["opcm"]["accuracy"]) == 2
    written = run.save(tmp_path / "partial.json")
    assert json.loads(written[0].read_text())["completed_steps"] == 2
    assert written[1].name == "partial.opcm.csv" and written[1].read_text().count("\n") == 4


def test_second_run_reuses_caches(tmp_path, mini_three):
    first = ContinualRun(config_for(mini_three), cache_dir=tmp_path)
    first.run()
    assert first.evaluator.images.decoded == 3 * SAMPLES
    evaluator = Evaluator(first.backbone, "cpu", SAMPLES, tmp_path)
    second = ContinualRun(config_for(mini_three), evaluator=evaluator, cache_dir=tmp_path)
    second.run()
    assert evaluator.images.decoded == 0
    assert second.references == first.references
    assert (
        second.results().to_json()["methods"]["opcm"]["accuracy"]
        == first.results().to_json()["methods"]["opcm"]["accuracy"]
    )


def test_cli_run_and_replay(tmp_path, monkeypatch, capsys, mini_three):
    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    args = [
        "run",
        "--backbone",
        "mini",
        "--method",
        "opcm",
        "--method",
        "task_arithmetic",
        "--opt",
        "alpha=0.6",
        "--opt",
        "task_arithmetic.scaling=0.2",
        "--samples",
        str(SAMPLES),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    for spec in mini_three:
        args += ["--checkpoint", spec.source]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("step ") == 3 and "opcm: ACC" in printed and "fine-tuned" in printed
    results = json.loads(out.read_text())
    assert results["config"]["methods"] == {"opcm": {"alpha": 0.6}, "task_arithmetic": {"scaling": 0.2}}  # typed
    assert results["methods"]["opcm"]["options"]["alpha"] == 0.6
    assert (tmp_path / "r.opcm.csv").is_file() and (tmp_path / "r.task_arithmetic.csv").is_file()
    replay = tmp_path / "replay.json"
    assert main(["run", "--config", str(out), "--out", str(replay)]) == 0
    again = json.loads(replay.read_text())
    for method in ("opcm", "task_arithmetic"):
        assert again["methods"][method]["accuracy"] == results["methods"][method]["accuracy"]
        assert again["methods"][method]["acc"] == results["methods"][method]["acc"]


def test_checkpoint_tasks_come_from_names_or_are_asked_for(tmp_path):
    tasks = registry()
    assert infer_task("/hub/tanganke/clip-vit-base-patch32_sun397", tasks) == "sun397"
    assert infer_task("tanganke/clip-vit-base-patch32_oxford-iiit-pet", tasks) == "oxford-iiit-pet"
    assert infer_task(str(tmp_path / "mini-digits"), tasks) == "mini-digits"
    assert parse_checkpoint(f"{tmp_path / 'my-model'}=mini-colors", tasks) == CheckpointSpec(
        str(tmp_path / "my-model"), "mini-colors"
    )
    with pytest.raises(MergingError, match=r"cannot tell which task checkpoint .*my-model was fine-tuned on"):
        parse_checkpoint(str(tmp_path / "my-model"), tasks)


def test_papers_shuffle_protocol():
    import random

    specs = [CheckpointSpec(str(i), "mini-digits") for i in range(8)]
    expected = list(specs)
    random.seed(42)
    random.shuffle(expected)
    assert shuffled(specs, 42) == expected and shuffled(specs, None) == specs


def test_bad_runs_are_refused_with_a_clear_message(tmp_path, mini_three, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MergingError, match="no fine-tuned checkpoints"):
        ContinualRun(config_for([]), cache_dir=tmp_path)
    hub_task = [CheckpointSpec(mini_three[0].source, "sun397")]
    with pytest.raises(
        MergingError,
        match=r"dataset of task sun397: dataset tanganke/sun397 is not in the local Hub cache and offline mode .* "
        r"\(needed for checkpoint .*mini-land-cover\)",
    ):
        ContinualRun(config_for(hub_task), cache_dir=tmp_path).prepare()
    with pytest.raises(MergingError, match="unknown task 'nope'"):
        ContinualRun(config_for([CheckpointSpec(mini_three[0].source, "nope")]), cache_dir=tmp_path).prepare()
    missing = ContinualRun(config_for([CheckpointSpec(str(tmp_path / "missing"), "mini-digits")]), cache_dir=tmp_path)
    with pytest.raises(MergingError, match="checkpoint not found"):  # constructing read nothing; preparing opens
        missing.prepare()


class ScriptedEvaluator:
    """Returns accuracies from a script, call by call, so the runner's bookkeeping can be checked by hand."""

    def __init__(self, script):
        self.script = list(script)

    def evaluate(self, state, tasks, heads=None):
        answer = self.script.pop(0)
        assert sorted(answer) == sorted(t.name for t in tasks)
        return answer


def test_accuracy_matrix_acc_and_bwt_by_hand(tmp_path, mini_three):
    a, b, c = (spec.task for spec in mini_three)
    script = [
        {a: 0.3, b: 0.2, c: 0.1},  # pretrained, every task
        {a: 0.95},
        {b: 0.9},
        {c: 0.99},  # each fine-tuned checkpoint on its own task
        {a: 0.9},  # after step 1
        {a: 0.8, b: 0.7},  # after step 2
        {a: 0.6, b: 0.65, c: 0.9},  # after step 3
    ]
    run = ContinualRun(config_for(mini_three), evaluator=ScriptedEvaluator(script), cache_dir=tmp_path)
    results = run.run().to_json()
    data = results["methods"]["opcm"]
    assert results["reference"] == {"pretrained": script[0], "finetuned": {a: 0.95, b: 0.9, c: 0.99}}
    assert data["accuracy"] == script[4:]
    assert data["acc_per_step"] == pytest.approx([0.9, (0.8 + 0.7) / 2, (0.6 + 0.65 + 0.9) / 3])
    assert data["bwt_per_step"][0] is None
    assert data["bwt_per_step"][1:] == pytest.approx([0.8 - 0.9, ((0.6 - 0.9) + (0.65 - 0.7)) / 2])
    assert data["acc"] == pytest.approx(0.716666667) and data["bwt"] == pytest.approx(-0.175)
    csv_path = run.save(tmp_path / "r.json")[1]
    assert csv_path.read_text().splitlines() == [
        "task,step 1,step 2,step 3",
        f"{a},0.9000,0.8000,0.6000",
        f"{b},,0.7000,0.6500",
        f"{c},,,0.9000",
    ]


def test_only_methods_that_read_train_images_need_a_train_split(tmp_path, monkeypatch, mini_three):
    """MINGLE reads only the test sample, OTMF its OT split and, tuning heads, the train split."""
    from merging.evaluation.tasks import ASSETS

    mini = json.loads((ASSETS / "mini" / "tasks.json").read_text())
    without_train = {
        name: {**entry, "dataset": {k: v for k, v in entry["dataset"].items() if k != "train_split"}}
        for name, entry in mini["tasks"].items()
    }
    registry_file = tmp_path / "no-train.json"
    registry_file.write_text(json.dumps({"tasks": without_train}))
    monkeypatch.setenv("MERGING_REGISTRY", str(registry_file))
    registry.cache_clear()
    try:
        checkpoints = mini_three[:2]
        with pytest.raises(MergingError, match=f"otmf needs labelled train images of task {checkpoints[0].task}"):
            ContinualRun(config_for(checkpoints, {"otmf": {}}), cache_dir=tmp_path).prepare()
        with pytest.raises(MergingError, match="names no train split"):  # OT on the test split, heads tuned on train
            ContinualRun(config_for(checkpoints, {"otmf": {"ot_split": "test", "head_tuning": "on"}})).prepare()
        ContinualRun(config_for(checkpoints, {"otmf": {"ot_split": "test"}}), cache_dir=tmp_path).prepare()
        run = ContinualRun(config_for(checkpoints, {"mingle": {"steps": 2, "rank": 4}}), cache_dir=tmp_path)
        results = run.run()
        assert results.completed_steps == 2
        data = results.methods["mingle"].steps[-1].diagnostics["data"]
        assert "test sample (5 per class" in data and data.endswith("no train images")
    finally:
        registry.cache_clear()
