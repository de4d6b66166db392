"""The step accounts (from the numbers), the classroom's prepared experiments and the plots' formulas."""

from __future__ import annotations

import gradio as gr
import pytest

import app
from merging.experiment.results import RunResults
from merging.ui import teaching
from merging.ui.hosting import SourcePolicy

TASKS = ["sun397", "stanford-cars", "resisc45"]


def results(steps: int = 3) -> RunResults:
    accuracy = [
        {"sun397": 0.9},
        {"sun397": 0.8, "stanford-cars": 0.7},
        {"sun397": 0.6, "stanford-cars": 0.75, "resisc45": 0.9},
    ]
    opcm = [{"diagnostics": {"lambda": 1.0 + 0.2 * t, "removed_share": 0.05 * t}} for t in range(steps)]
    masks = {
        "pre": {"mean": 0.97, "std": 0.1, "below_0.5": 0.01, "above_1.5": 0.02},
        "post": {"mean": 1.02, "std": 0.2},
    }
    otmf = [{"diagnostics": {"masks": masks}} for _ in range(steps)]
    return RunResults.from_json(
        {
            "config": {"checkpoints": [{"source": t, "task": t} for t in TASKS]},
            "tasks": TASKS,
            "reference": {"pretrained": dict.fromkeys(TASKS, 0.5), "finetuned": dict.fromkeys(TASKS, 0.95)},
            "methods": {
                "opcm": {"options": {}, "accuracy": accuracy[:steps], "steps": opcm},
                "otmf": {"options": {}, "accuracy": accuracy[:steps], "steps": otmf},
                "ties": {"options": {}, "accuracy": accuracy[:steps], "steps": [{"diagnostics": {}}] * steps},
            },
        }
    )


def test_a_step_account_says_what_entered_what_each_method_did_and_what_earlier_tasks_lost():
    text = teaching.step_account(results())
    first, opcm, otmf, ties = text.split("\n\n")
    assert first == "**Step 3: resisc45 entered.** Its fine-tuned model scores 95.0% on it, the pretrained one 50.0%."
    assert "projected away 10.0% of the new task vector" in opcm and "λ = 1.40" in opcm
    assert "scores 90.0% on resisc45 (94.7% of its fine-tuned accuracy)" in opcm
    # sun397 0.8 → 0.6, stanford-cars 0.7 → 0.75: a mean loss of 7.5 points, sun397 the most
    assert "The earlier tasks lost 7.5 points on average; sun397 lost most (-20.0)." in opcm
    assert "BWT so far -12.5." in opcm  # (0.6 − 0.9 + 0.75 − 0.7) / 2
    assert "the pre masks average 0.97 (± 0.10), 3.0% of entries below 0.5 or above 1.5" in otmf
    assert ties.startswith("**ties** merged it by its rule.")
    assert teaching.step_account(results(1)).count("The earlier tasks") == 0  # nothing earlier at step 1
    assert teaching.step_account(RunResults(config={}, tasks=[], methods={})) == ""


def test_every_prepared_experiment_sets_up_a_valid_run_and_a_bad_one_is_refused():
    handlers = app.LabHandlers(hosted=True)
    for prepared in teaching.EXPERIMENTS:
        preset, checkpoints, methods, eval_mode, seed, note, *options = handlers.classroom(prepared.key)
        assert (
            note.startswith(f"**{prepared.title}.**")
            and preset == prepared.preset
            and methods == list(prepared.methods)
        )
        # what the buttons put on the page is what Run then checks and runs
        config = handlers.lab_request(
            "mini", preset, checkpoints, methods, 48, eval_mode, "cpu", seed, False, tuple(options)
        ).config(SourcePolicy(hosted=True))
        assert len(config.checkpoints) == int(prepared.preset.split("-")[1]) and list(config.methods) == methods
        for (method, option), value in prepared.options.items():
            assert config.methods[method][option] == value
    assert handlers.classroom("scaling")[2] == ["task_arithmetic", "weight_average", "opcm"]
    with pytest.raises(gr.Error, match="experiment must be one of scaling, projection, forgetting"):
        handlers.classroom("../../etc")


def test_every_plot_has_its_formula():
    assert set(teaching.FORMULAS) == {"matrix", "acc_bwt", "curves", "cosine", "spectra", "removed"}
    assert all(text.count("$") % 2 == 0 and "$" in text for text in teaching.FORMULAS.values())
