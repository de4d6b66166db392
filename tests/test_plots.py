"""Figures and the published reference markers, from results built by hand (as results.json holds them)."""

from __future__ import annotations

import pytest

from merging.experiment.results import RunResults
from merging.methods import METHODS
from merging.ui import plots


def results(preset="TA8", backbone="ViT-B-32") -> RunResults:
    return RunResults.from_json(results_json(preset, backbone))


def results_json(preset="TA8", backbone="ViT-B-32"):
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
    assert plots.published_markers(results().config)["opcm"] == {"ACC": 75.5, "BWT": -6.3}
    assert plots.published_markers(results(backbone="openai/clip-vit-large-patch14").config)["magmax"]["ACC"] > 0
    assert plots.published_markers(results(preset="mini-8", backbone="mini").config) == {}
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
    shown = plots.styled_table(table).to_html()  # one number of decimals per column, BWT signed, no "nan"
    assert ">71.7<" in shown and ">-17.5<" in shown and "nan" not in shown
    internals = plots.internals_figure(data, "opcm")
    assert [list(t.y) for t in internals.data if t.name == "√t"] == [pytest.approx([1.0, 2**0.5, 3**0.5])]


def test_results_load_from_json_and_derive_acc_bwt_from_the_one_matrix():
    old = results_json()  # as written before the schema version existed
    typed = RunResults.from_json(old)
    opcm = typed.methods["opcm"]
    assert opcm.matrix() == [[0.9, 0.8, 0.6], [None, 0.7, 0.65], [None, None, 0.9]]
    assert opcm.acc_per_step == pytest.approx(old["methods"]["opcm"]["acc_per_step"])
    assert opcm.bwt_per_step[0] is None and opcm.bwt_per_step[1:] == pytest.approx([-0.1, -0.175])
    again = typed.to_json()
    assert again["schema_version"] == 2 and RunResults.from_json(again).to_json() == again
    assert again["methods"]["opcm"]["accuracy"] == old["methods"]["opcm"]["accuracy"]
    with pytest.raises(Exception, match="newer version"):
        RunResults.from_json({**again, "schema_version": 99})


def test_every_method_with_a_figure_draws_it_from_its_declared_diagnostics():
    data = results()
    for cls in METHODS.values():
        if cls.figure_title is None:
            assert cls.live_figure(data.methods["opcm"]) is None
        else:  # a method that declares a figure draws one from steps that carry only common diagnostics
            assert cls.live_figure(data.methods["opcm"]) is not None
    assert plots.internals_figure(data, "no-such-method") is None


def test_spectrum_figure_marks_the_alpha_cut():
    marks = METHODS["opcm"].spectrum_marks({"alpha": 0.5})
    figure = plots.spectrum_figure({"τ a": [3.0, 1.0], "merged": [2.0, 2.0]}, "layer", marks)
    cumulative = [list(t.y) for t in figure.data if t.showlegend is False]
    assert cumulative == [pytest.approx([0.75, 1.0]), pytest.approx([0.5, 1.0])]
    assert any(shape.y0 == 0.5 for shape in figure.layout.shapes)


def with_analysis() -> RunResults:
    """Three steps with OPCM's per-matrix diagnostics and the live analysis, as results.json holds them."""
    data = results_json()
    steps = data["methods"]["opcm"]["steps"]
    q, fc = "transformer.resblocks.1.attn.in_proj_weight[q]", "transformer.resblocks.0.mlp.c_fc.weight"
    steps[1] = {
        **steps[1],
        "diagnostics": {"matrices": {fc: {"split": 1, "removed_share": 0.2}, q: {"split": 0, "removed_share": 0.1}}},
    }
    steps[2] = {
        **steps[2],
        "diagnostics": {"matrices": {fc: {"split": 1, "removed_share": 0.4}, q: {"split": 1, "removed_share": 0.3}}},
    }
    tasks = data["tasks"]
    data["analysis"] = [
        {
            "step": t,
            "task": tasks[t - 1],
            "layer": fc,
            "layer_name": "block 0 · mlp.c_fc",
            "task_norm": 1.0,
            "task_cosines": [0.1 * i for i in range(1, t)],
            "merged_norms": {"opcm": 1.0},
            "merged_cosines": {"opcm": [0.5] * t},
            "merged_pairs": {},
            "task_spectrum": [3.0, 1.0],
            "merged_spectra": {"opcm": [2.0, 1.0, 1.0]},
            "exact": False,
            "sketch_dimension": 2**19,
            "seconds": 0.1,
        }
        for t in (1, 2, 3)
    ]
    return RunResults.from_json(data)


def test_live_analysis_figures_and_the_removed_share_heatmap():
    data = with_analysis()
    assert RunResults.from_json(data.to_json()).analysis == data.analysis  # kept in results.json
    cosine = plots.live_cosine_figure(data)
    assert list(cosine.data[0].y) == ["τ1 sun397", "τ2 stanford-cars", "τ3 resisc45", "merged opcm"]
    assert list(cosine.data[0].x) == ["τ1", "τ2", "τ3", "opcm"]  # short across, so 20 fit unrotated
    z = [list(row) for row in cosine.data[0].z]
    assert z[2][:3] == pytest.approx([0.1, 0.2, 1.0]) and z[0][2] == pytest.approx(0.1) and z[3][0] == 0.5
    assert "sketch" in plots.title_text(cosine) and "after step 3" in plots.title_text(cosine)
    spectra = plots.live_spectrum_figure(data)
    assert plots.title_text(spectra) == "Spectra of block 0 · mlp.c_fc after step 3 (+resisc45)"
    # OPCM's α = 0.5 on its own merged curve: shares 0.5, 0.75, 1 → one direction at or below α
    assert [a.text for a in spectra.layout.annotations][-2:] == ["opcm α = 0.5", "opcm α = 0.5: r = 1"]
    assert any(shape.x0 == 0.5 for shape in spectra.layout.shapes)
    removed = plots.matrix_share_heatmap(data, "opcm")
    assert list(removed.data[0].y) == ["block 0 · mlp.c_fc", "block 1 · attn.q"]
    assert [list(row) for row in removed.data[0].z] == [[None, 20.0, 40.0], [None, 10.0, 30.0]]
    assert plots.matrix_share_heatmap(results(), "opcm") is None  # no per-matrix diagnostics: no figure
    assert plots.live_cosine_figure(results()) is None and plots.live_spectrum_figure(results()) is None


def lab_distance(first: str, second: str) -> float:
    """CIELAB (D65) distance between two sRGB colours: about 2.3 is just noticeable, 10 plainly apart."""
    import math

    def lab(hex_colour: str) -> tuple[float, float, float]:
        r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
        r, g, b = ((c / 12.92) if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b))
        x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
        y = 0.2126 * r + 0.7152 * g + 0.0722 * b
        z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883
        f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in (x, y, z)]
        return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])

    return math.dist(lab(first), lab(second))


def twenty_tasks() -> RunResults:
    """A 20-task run (TALL20's size) with one method, every task evaluated after every step."""
    tasks = [f"task-{i:02d}" for i in range(20)]
    accuracy = [{t: 0.5 + 0.02 * ((i + s) % 20) for i, t in enumerate(tasks[: s + 1])} for s in range(20)]
    step = {"merge_seconds": 0.1, "eval_seconds": 0.2, "diagnostics": {}}
    data = {
        "config": {"backbone": "mini", "checkpoints": [{"source": t, "task": t} for t in tasks]},
        "tasks": tasks,
        "reference": {"pretrained": dict.fromkeys(tasks, 0.4), "finetuned": dict.fromkeys(tasks, 0.9)},
        "methods": {"opcm": {"options": {}, "accuracy": accuracy, "steps": [step] * 20}},
    }
    return RunResults.from_json(data)


def test_twenty_tasks_get_twenty_distinct_colours_and_keep_them_in_every_plot():
    data = twenty_tasks()
    curves = plots.per_task_curves(data, "opcm")
    colours = [t.line.color for t in curves.data]
    assert len(colours) == 20 and len(set(colours)) == 20
    worst = min(lab_distance(a, b) for i, a in enumerate(colours) for b in colours[:i])
    assert worst >= 10, worst  # plainly apart, not two shades of one blue
    assert len(set(plots.METHOD_COLOURS)) == len(METHODS) <= len(plots.METHOD_COLOURS)
    # the spectra draw τ_t in its task's colour and a merged delta in its method's, as the other plots do
    spectra = plots.spectrum_figure(
        {"τ12 task-11": [2.0, 1.0], "merged opcm": [3.0, 1.0]},
        "layer",
        colours=plots.spectrum_colours(data, {"τ12 task-11": 0, "merged opcm": 0}),
    )
    by_name = {t.name: t.line.color for t in spectra.data}
    assert by_name["τ12 task-11"] == colours[11] == plots.task_colour(data, "task-11")
    acc = plots.acc_bwt_figure(data)
    assert {t.line.color for t in acc.data if t.name == "opcm"} == {by_name["merged opcm"]}


def test_log_ticks_are_whole_numbers_not_bare_digits_and_heatmaps_fit_twenty_tasks():
    values, labels = plots.log_ticks([0.012, 0.03, 0.9, 7.0])
    assert labels == ["0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5"]
    assert values == pytest.approx([0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5])
    assert plots.log_ticks([0.004, 7.0])[1] == ["0.01", "0.1", "1"]  # over 3 decades: powers of ten only
    assert plots.log_ticks([1e-6, 1.0])[1] == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1", "1"]
    assert plots.log_ticks([0.31, 0.33])[1] == ["0.2", "0.5"]  # a narrow range still gets a tick either side
    figure = plots.spectrum_figure({"τ1 a": [5.0, 0.3, 0.01]}, "layer")
    assert list(figure.layout.yaxis.ticktext) == ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5"]
    data = twenty_tasks()
    heatmap = plots.accuracy_heatmap(data, "opcm")
    assert list(heatmap.data[0].x) == [str(t) for t in range(1, 21)]  # step numbers: no rotated task names
    assert heatmap.data[0].texttemplate is None  # no numbers crammed into 400 cells; the hover has them
    names = [f"τ{t} task-{t - 1:02d}" for t in range(1, 21)] + ["merged opcm"]
    cosine = plots.cosine_heatmap([[0.0] * 21] * 21, names)
    assert max(len(x) for x in cosine.data[0].x) <= 4 and cosine.layout.xaxis.tickangle == 0
    long = plots.acc_bwt_figure(data)
    assert "<br>" not in long.layout.title.text  # short enough to fit a half-width plot
    wrapped = plots.styled(plots.go.Figure(), "a title " * 12)
    assert all(len(line) <= plots.TITLE_CHARS for line in wrapped.layout.title.text.split("<br>"))
