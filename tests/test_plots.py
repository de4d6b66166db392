"""Figures and the published reference markers, from results dicts built by hand."""

from __future__ import annotations

import pytest

from merging import plots


def results(preset="TA8", backbone="ViT-B-32"):
    tasks = ["sun397", "stanford-cars", "resisc45"]
    accuracy = [
        {"sun397": 0.9},
        {"sun397": 0.8, "stanford-cars": 0.7},
        {"sun397": 0.6, "stanford-cars": 0.65, "resisc45": 0.9},
    ]
    step = {"merge_seconds": 0.5, "eval_seconds": 1.0, "diagnostics": {"lambda": 1.0, "removed_share": 0.0}}
    return {
        "config": {"backbone": backbone, "preset": preset, "checkpoints": [{"source": t, "task": t} for t in tasks]},
        "tasks": tasks,
        "reference": {"pretrained": dict.fromkeys(tasks, 0.5), "finetuned": dict.fromkeys(tasks, 0.95)},
        "methods": {
            "opcm": {
                "options": {"alpha": 0.5},
                "accuracy": accuracy,
                "acc": 0.7166666,
                "bwt": -0.175,
                "acc_per_step": [0.9, 0.75, 0.7166666],
                "bwt_per_step": [None, -0.1, -0.175],
                "steps": [step, step, step],
            }
        },
    }


def test_published_markers_only_for_standard_presets_on_openai_backbones():
    assert plots.published_markers(results()["config"])["opcm"] == {"ACC": 75.5, "BWT": -6.3}
    assert plots.published_markers(results(backbone="openai/clip-vit-large-patch14")["config"])["magmax"]["ACC"] > 0
    assert plots.published_markers(results(preset="mini-8", backbone="mini")["config"]) == {}
    figure = plots.acc_bwt_figure(results())
    stars = [t for t in figure.data if t.name == "opcm (published)"]
    assert [list(t.y) for t in stars] == [[75.5], [-6.3]] and all(list(t.x) == [3] for t in stars)
    assert not any("published" in (t.name or "") for t in plots.acc_bwt_figure(results("mini-8", "mini")).data)


def test_matrix_curves_and_table_match_the_results():
    data = results()
    heatmap = plots.accuracy_heatmap(data, "opcm")
    assert heatmap.data[0].z[1] == (None, 70.0, 65.0) or list(heatmap.data[0].z[1]) == [None, 70.0, 65.0]
    assert heatmap.layout.uirevision == plots.UIREVISION
    lines = plots.acc_bwt_figure(data)
    reference = next(t for t in lines.data if t.name.startswith("finetuned"))
    assert list(reference.y) == pytest.approx([95.0, 95.0, 95.0])
    curves = plots.per_task_curves(data, "opcm")
    assert [list(t.x) for t in curves.data] == [[1, 2, 3], [2, 3], [3]]
    table = plots.results_table(data)
    assert table["method"].tolist() == ["pretrained", "finetuned", "opcm"]
    assert table.loc[2, "ACC (%)"] == pytest.approx(71.67) and table.loc[2, "BWT (%)"] == pytest.approx(-17.5)
    internals = plots.opcm_lambda_figure(data)
    assert [list(t.y) for t in internals.data if t.name == "√t"] == [pytest.approx([1.0, 2**0.5, 3**0.5])]


def test_spectrum_figure_marks_the_alpha_cut():
    figure = plots.spectrum_figure({"τ a": [3.0, 1.0], "merged": [2.0, 2.0]}, "layer", alpha=0.5)
    cumulative = [list(t.y) for t in figure.data if t.showlegend is False]
    assert cumulative == [pytest.approx([0.75, 1.0]), pytest.approx([0.5, 1.0])]
    assert any(shape.y0 == 0.5 for shape in figure.layout.shapes)
