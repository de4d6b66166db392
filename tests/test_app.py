"""The app's handlers at function level (the page itself is exercised by the UI issue's browser tests)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import gradio as gr
import pytest

import app
from app import RunView
from merging.experiment.runner import ContinualRun, RunConfig, preset_checkpoints
from merging.io.checkpoints import load_encoder
from merging.methods import METHODS
from merging.ui import lab

HANDLERS = app.LabHandlers(hosted=False)


def merge(*args, handlers=HANDLERS, layout="hf", duplicates=False):
    """The Merge page's handler as the page calls it (no request: the local session)."""
    method, pretrained, checkpoints, options, device = args
    return list(handlers.merge_checkpoints(None, method, pretrained, checkpoints, options, device, layout, duplicates))


def test_merge_handler_streams_one_update_per_step_and_offers_the_download(checkpoint_dirs):
    base, fine = checkpoint_dirs
    updates = merge("opcm", str(base), "\n".join(map(str, fine)), "opcm.alpha=0.5", "cpu")
    logs = [u[0] for u in updates]
    assert [log.count("step ") for log in logs] == [0, 1, 2, 3, 3]
    assert "lambda=" in logs[-2] and "removed=" in logs[-2]
    assert "merged encoder ready to download (hf layout)" in logs[-1]
    files, folder = updates[-1][1:]
    assert {Path(f).name for f in files} == {"model.safetensors", "config.json"}
    assert HANDLERS.workspaces.owns(None, folder) and all(Path(f).parent == Path(folder) for f in files)
    assert set(load_encoder(Path(folder))) >= {"conv1.weight", "ln_post.weight"}
    open_clip_files = merge("magmax", str(base), str(fine[0]), "", "cpu", layout="open_clip")[-1][1]
    assert [Path(f).name for f in open_clip_files] == ["merged-magmax.safetensors"]


def test_bad_input_becomes_a_gradio_error(tmp_path, checkpoint_dirs):
    base, fine = checkpoint_dirs
    with pytest.raises(gr.Error, match="checkpoint not found"):
        merge("opcm", str(base), str(tmp_path / "missing"), "", "cpu")
    with pytest.raises(gr.Error, match="unknown option 'beta'"):
        merge("opcm", str(base), str(fine[0]), "beta=2", "cpu")
    with pytest.raises(gr.Error, match="listed twice"):
        merge("opcm", str(base), f"{fine[0]}\n{fine[0]}", "", "cpu")
    assert len(merge("opcm", str(base), f"{fine[0]}\n{fine[0]}", "", "cpu", duplicates=True)[-1][1]) == 2
    with pytest.raises(gr.Error, match="method must be one of"):
        merge("otmf", str(base), str(fine[0]), "", "cpu")  # needs task data: not a merge-page method


def test_page_offers_its_endpoints_and_every_registered_method():
    """The API a script sees: the four named endpoints, the run's full input list, the methods.

    The method lists come from the registry, so a method added to it must reach the page.
    """
    endpoints = app.build_app().get_api_info()["named_endpoints"]
    assert {"/run", "/merge", "/analyse", "/stop", "/layer"} <= set(endpoints)
    run = {p["parameter_name"]: p for p in endpoints["/run"]["parameters"]}
    # every input a script sends, every method's options included, and the live spectra's layer
    assert len(run) == len(lab_inputs()) + 1
    assert run["spectrum_layer"]["parameter_has_default"] and run["spectrum_layer"]["parameter_default"] == ""
    assert run["methods"]["type"]["items"]["enum"] == list(METHODS)
    # every method option is named METHOD_OPTION for a script, none is a bare param_N, and the order seed is optional
    assert [name for name in run if name.startswith("param_")] == []
    assert {"opcm_alpha", "dop_lr", "nufilt_null_rank", "mingle_seed_per_class"} <= set(run)
    assert run["order_seed"]["parameter_has_default"] and run["order_seed"]["parameter_default"] is None
    merge_methods = [name for name, cls in METHODS.items() if not cls.requires_data]
    assert endpoints["/merge"]["parameters"][0]["type"]["enum"] == merge_methods
    assert endpoints["/stop"]["parameters"] == []
    text = app.methods_markdown()
    for name in METHODS:
        assert f"`{name}`" in text


# ---------------------------------------------------------------- the continual lab's handlers


OPTION_DEFAULTS = [o.default for cls in METHODS.values() for o in cls.options]
SAMPLES = 48


def lab_inputs(methods=("opcm",), checkpoints=None, samples=SAMPLES, options=None, duplicates=False):
    """The Run endpoint's inputs, as a script sends them."""
    text = lab.preset_text("mini-8", "mini") if checkpoints is None else checkpoints
    return [
        "mini",
        "mini-8",
        text,
        list(methods),
        samples,
        "seen",
        "cpu",
        None,
        "hf",
        duplicates,
        *(options or OPTION_DEFAULTS),
    ]


def run_lab(*inputs, handlers=HANDLERS):
    """The Run handler as the page calls it, for the local session."""
    return handlers.run_lab(None, *inputs)


def updates_until_error(stream) -> tuple[list, str]:
    """Every update a failing run streams, and the message of the error toast it ends with."""
    updates = []
    with pytest.raises(gr.Error) as error:
        for update in stream:
            updates.append(update)
    assert error.value.title == "Error" and not error.value.print_exception
    return updates, error.value.message


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "cache"))


def test_lab_streams_one_update_per_step_and_matches_the_runner(private_cache):
    updates = list(run_lab(*lab_inputs(("opcm", "task_arithmetic"))))
    # two updates before the first step (checkpoints found; reference rows ready), then one per step
    assert len(updates) == 2 + 8 and [u[0].startswith("Step ") for u in updates] == [False] * 2 + [True] * 8
    status, heatmap, lines, curves, table, files, results, _, internals, cosine, spectra, removed, _, account = updates[
        -1
    ]
    assert [f.name for f in fields(RunView)][6:] == [
        "results",
        "shown",
        "internals",
        "cosine",
        "spectra",
        "removed",
        "layer",
        "account",
    ]
    # the last step in plain words, from its numbers: what entered, what OPCM did, what the others lost
    assert account.startswith(f"**Step 8: {results['tasks'][-1]} entered.**") and "projected away" in account
    assert f"λ = {results['methods']['opcm']['steps'][-1]['diagnostics']['lambda']:.2f}" in account
    assert "**task_arithmetic** merged it" in account and "BWT so far" in account
    # the internals of the method shown (the first), under the label that method declares
    assert internals["value"] is not None and internals["label"] == METHODS["opcm"].figure_title
    assert status.startswith("Step 8/8") and "Done in" in status
    assert updates[1][1] is None and updates[2][1] is not None  # the matrix appears with the first step
    # the live analysis: after every step the cosine heatmap gains the new task vector's row ...
    assert [len(u[9].data[0].z) for u in updates[2:]] == [t + 2 for t in range(1, 9)]  # τ_1..τ_t, two merged
    assert (
        cosine.data[0].y[-2:] == ("merged opcm", "merged task_arithmetic")
        and "after step 8" in cosine.layout.title.text
    )
    assert len(results["analysis"]) == 8 and all(a["seconds"] > 0 for a in results["analysis"])
    # ... and the spectra show the default layer of τ_8 and both merged deltas, with OPCM's α cut on its own curve
    assert spectra.layout.title.text.startswith("Spectra of block 1 · mlp.c_fc after step 8")
    assert [t.name for t in spectra.data if t.showlegend is not False] == [
        f"τ8 {results['tasks'][-1]}",
        "merged opcm",
        "merged task_arithmetic",
    ]
    assert any(a.text.startswith("opcm α = 0.5: r = ") for a in spectra.layout.annotations)
    # OPCM's removed share per layer × step: 12 matrices of the mini encoder, none removed at step 1
    assert len(removed.data[0].y) == 12 and removed.data[0].y[0] == "block 0 · attn.q"
    assert all(row[0] is None and all(0 <= v <= 100 for v in row[1:]) for row in removed.data[0].z)
    layer_list = updates[0][12]  # once, when the run knows its encoder: the default first, then every matrix
    assert layer_list["value"] == "" and layer_list["choices"][:2] == [
        ("default (block 1 · mlp.c_fc)", ""),
        ("block 0 · attn.q", "transformer.resblocks.0.attn.in_proj_weight[q]"),
    ]
    assert all(u[12] == gr.skip() for u in updates[1:])
    # before step 1 (the tables are Stylers: their numbers are .data)
    assert updates[0][4].data.empty and updates[1][4].data["method"].tolist() == ["pretrained", "finetuned"]
    assert len(heatmap.data[0].z) == 8 and len(curves.data) == 8 and len(lines.data) >= 4
    shown, table = table, table.data  # a Styler: the numbers, and how the page prints them
    assert table["method"].tolist() == ["pretrained", "finetuned", "opcm", "task_arithmetic"]
    assert table.loc[2, "ACC (%)"] == pytest.approx(100 * results["methods"]["opcm"]["acc"], abs=0.01)
    display = gr.Dataframe().postprocess(shown).model_dump()["metadata"]["display_value"]
    assert display[2][1] == f"{table.loc[2, 'ACC (%)']:.1f}" and display[2][2].startswith(("+", "-"))
    assert display[0][2:] == ["", "", ""]  # reference rows have no BWT or times
    direct = (
        ContinualRun(
            RunConfig(
                checkpoints=preset_checkpoints("mini-8"),
                methods={"opcm": {}, "task_arithmetic": {}},
                samples=SAMPLES,
                device="cpu",
                preset="mini-8",
            )
        )
        .run()
        .to_json()
    )
    for name in ("opcm", "task_arithmetic"):
        assert results["methods"][name]["accuracy"] == direct["methods"][name]["accuracy"]
    names = {Path(f).name for f in files}
    assert names >= {"results.json", "results.opcm.csv", "config.json", "merged-opcm.safetensors"}


def test_the_downloaded_config_replays_with_the_command_line(private_cache, tmp_path):
    from merging.cli.main import main

    files, results = list(run_lab(*lab_inputs(checkpoints=lab.preset_text("mini-8", "mini"))))[-1][5:7]
    config = next(f for f in files if f.endswith("config.json"))
    assert main(["run", "--config", config, "--out", str(tmp_path / "replay.json")]) == 0
    replay = json.loads((tmp_path / "replay.json").read_text())
    assert replay["methods"]["opcm"]["accuracy"] == results["methods"]["opcm"]["accuracy"]
    merged = load_encoder(next(f for f in files if f.endswith("merged-opcm.safetensors")))
    assert "conv1.weight" in merged


def test_stopping_keeps_what_was_computed(private_cache):
    stream = run_lab(*lab_inputs())
    updates = [next(stream) for _ in range(5)]  # checkpoints, references, then three steps
    stream.close()  # what Gradio does when Stop cancels the event
    files, results = updates[-1][5:7]
    saved = json.loads(Path(next(f for f in files if f.endswith("results.json"))).read_text())
    assert saved["completed_steps"] == 3 == len(results["methods"]["opcm"]["accuracy"])


def test_options_and_bad_requests(private_cache):
    values = list(OPTION_DEFAULTS)
    alpha = next(i for i, (m, o) in enumerate(lab.option_fields()) if (m, o) == ("opcm", "alpha"))
    values[alpha] = 0.7
    assert lab.options_from_values(["opcm", "ties"], values) == {"opcm": {"alpha": 0.7}, "ties": {}}
    for inputs, message in (
        (lab_inputs(checkpoints=""), "the checkpoint list is empty"),
        (lab_inputs(methods=()), "choose at least one method"),
        (
            lab_inputs(checkpoints="/nowhere/model"),
            "cannot tell which task checkpoint /nowhere/model was fine-tuned on",
        ),
        (lab_inputs(options=[*values[:alpha], 1.5, *values[alpha + 1 :]]), "opcm option alpha=1.5 is out of range"),
    ):
        updates, toast = updates_until_error(run_lab(*inputs))
        assert len(updates) == 1 and message in updates[0][0] and updates[0][0].startswith("**Error:**")
        assert message in toast
        assert all(isinstance(u, dict) and u.get("__type__") == "update" for u in updates[0][1:])  # gr.skip()
    with pytest.raises(gr.Error, match="preset TA8 has Hub checkpoints only for the OpenAI CLIP backbones"):
        HANDLERS.preset_list("TA8", "mini")


def test_editing_the_checkpoint_list(tmp_path, monkeypatch):
    text = lab.preset_text("mini-8", "mini")
    assert text.splitlines()[0] == "assets/mini/checkpoints/mini-land-cover=mini-land-cover"  # shown short
    specs = lab.parse_checkpoint_lines(text)
    monkeypatch.chdir(tmp_path)  # from anywhere, project paths resolve to absolute ones (configs replay)
    assert lab.parse_checkpoint_lines(text) == specs and Path(specs[0].source).is_absolute()
    assert lab.parse_checkpoint_lines("org/clip-vit-base-patch32_svhn")[0].source == "org/clip-vit-base-patch32_svhn"
    moved = lab.parse_checkpoint_lines(HANDLERS.edit_list(text, "down", 1, ""))
    assert [s.task for s in moved[:2]] == [specs[1].task, specs[0].task]
    up = lab.parse_checkpoint_lines(HANDLERS.edit_list(text, "up", 1, ""))
    assert up == specs  # the first row cannot move up
    removed = lab.parse_checkpoint_lines(HANDLERS.edit_list(text, "remove", 8, ""))
    assert removed == specs[:7]
    added = lab.parse_checkpoint_lines(HANDLERS.edit_list(text, "add", None, "org/clip-vit-base-patch32_svhn"))
    assert added[-1].source == "org/clip-vit-base-patch32_svhn" and added[-1].task == "svhn"
    import random

    expected = list(specs)
    random.seed(42)
    random.shuffle(expected)
    assert lab.parse_checkpoint_lines(HANDLERS.shuffle_list(text, 42)) == expected
    with pytest.raises(gr.Error, match="give an order seed"):
        HANDLERS.shuffle_list(text, None)


def test_analysis_reads_the_run(private_cache):
    with pytest.raises(gr.Error, match="run something first"):
        HANDLERS.analyse(None, None, "")
    three = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:3])
    update = list(run_lab(*lab_inputs(("opcm", "otmf"), checkpoints=three)))[-1]
    results, opcm = update[6], update[8]["value"]
    otmf = HANDLERS.show_method(results, "otmf")[2]
    assert otmf["label"] == METHODS["otmf"].figure_title
    otmf = otmf["value"]
    cosine, spectra = HANDLERS.analyse(None, results, "")
    assert len(cosine.data[0].z) == 5  # three task vectors and two merged deltas
    assert len(spectra.data) == 2 * 5
    assert [t.y[-1] for t in opcm.data if t.name == "√t"] == [pytest.approx(3**0.5)]
    assert sum(1 for t in otmf.data if (t.name or "").startswith("step")) == 2 * 2  # pre and post, steps 2 and 3
    assert any("mask mean" in (t.name or "") for t in otmf.data)
    with pytest.raises(gr.Error, match="no matrix 'nope'"):
        HANDLERS.analyse(None, results, "nope")


def test_the_spectra_follow_a_layer_changed_mid_run_and_bad_layers_are_refused(private_cache):
    three = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:3])
    query = "transformer.resblocks.0.attn.in_proj_weight[q]"
    stream = run_lab(*lab_inputs(checkpoints=three))
    updates = [next(stream) for _ in range(3)]  # checkpoints found, reference rows, step 1
    assert "block 1 · mlp.c_fc after step 1" in updates[-1][10].layout.title.text
    with pytest.raises(gr.Error, match=r"no matrix 'transformer\.resblocks\.9\.mlp\.c_fc\.weight' in this encoder"):
        HANDLERS.choose_layer(None, updates[-1][6], "transformer.resblocks.9.mlp.c_fc.weight")
    assert HANDLERS.choose_layer(None, updates[-1][6], query) == gr.skip()  # shown from the next step
    updates += list(stream)
    titles = [u[10].layout.title.text for u in updates[3:]]
    assert [t.split(" after")[0] for t in titles] == ["Spectra of block 0 · attn.q"] * 2
    results = updates[-1][6]
    assert [a["layer"] for a in results["analysis"]] == ["transformer.resblocks.1.mlp.c_fc.weight", query, query]
    assert HANDLERS.live_layers == {}  # the run is over: a change is for the final state, at once
    final = HANDLERS.choose_layer(None, results, "transformer.resblocks.0.mlp.c_proj.weight")
    assert final.layout.title.text.startswith("Spectra of block 0 · mlp.c_proj after step 3")
    assert [t.name for t in final.data if t.showlegend is not False] == [f"τ3 {results['tasks'][-1]}", "merged opcm"]
    # the final state's τ_3 spectrum of the run's own layer equals the live one
    again = HANDLERS.choose_layer(None, results, query)
    assert list(again.data[0].y) == pytest.approx(results["analysis"][-1]["task_spectrum"], rel=1e-4)
    for bad, message in ((["a list"], "a layer is named by text"), ("nope", "no matrix 'nope' in this encoder")):
        with pytest.raises(gr.Error, match=message):
            HANDLERS.choose_layer(None, results, bad)
    # the run itself refuses a bad layer before any work, naming it
    updates, toast = updates_until_error(
        HANDLERS.run_lab(None, *lab_inputs(checkpoints=three), spectrum_layer="block 1 · mlp.c_fc")
    )
    assert toast.startswith("no matrix 'block 1 · mlp.c_fc' in this encoder") and len(updates) == 1


# ---------------------------------------------------------------- the page over HTTP


def downloaded_results(outputs) -> dict:
    files = outputs[5]
    path = next(f for f in files if Path(f).name == "results.json")
    return json.loads(Path(path).read_text())


def test_client_run_takes_method_options_by_name(served_app):
    """A script names only what it changes: other options keep their defaults, the order seed may be left out."""
    from gradio_client import Client

    short = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:2])
    final = Client(served_app, verbose=False).predict(
        checkpoints=short,
        methods=["task_arithmetic"],
        samples=SAMPLES,
        device="cpu",
        task_arithmetic_scaling=0.5,
        api_name="/run",
    )
    results = downloaded_results(final)
    assert results["methods"]["task_arithmetic"]["options"] == {"scaling": 0.5}
    assert results["completed_steps"] == 2 and results["config"]["order_seed"] is None
    _, message = updates_until_error(HANDLERS.run_lab(None, *lab_inputs()[:7], task_arithmetic_lambda=0.5))
    assert message.startswith("unknown option parameter 'task_arithmetic_lambda': method options are named")
    _, message = updates_until_error(HANDLERS.run_lab(None, *lab_inputs(), task_arithmetic_scaling=0.5))
    assert message == "give the method options by name or by position, not both"


def test_client_run_streams_every_step_and_equals_the_command_line(served_app, tmp_path):
    from gradio_client import Client

    from merging.cli.main import main

    job = Client(served_app, verbose=False).submit(*lab_inputs(), api_name="/run")
    final = job.result()
    assert len(job.outputs()) == 2 + 8
    assert [o[0].split(":")[0] for o in job.outputs()[2:]] == [
        f"Step {t}/8 (+{s.task})" for t, s in enumerate(preset_checkpoints("mini-8"), 1)
    ]
    served_results = downloaded_results(final)
    out = tmp_path / "cli.json"
    assert (
        main(
            [
                "run",
                "--backbone",
                "mini",
                "--preset",
                "mini-8",
                "--method",
                "opcm",
                "--samples",
                str(SAMPLES),
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cli = json.loads(out.read_text())
    assert served_results["methods"]["opcm"]["accuracy"] == cli["methods"]["opcm"]["accuracy"]
    assert served_results["methods"]["opcm"]["acc"] == cli["methods"]["opcm"]["acc"]


def test_two_clients_at_once_get_their_own_results(served_app):
    from gradio_client import Client

    short = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:3])
    first = Client(served_app, verbose=False).submit(*lab_inputs(("opcm",), checkpoints=short), api_name="/run")
    second = Client(served_app, verbose=False).submit(*lab_inputs(("magmax",), checkpoints=short), api_name="/run")
    one, two = downloaded_results(first.result()), downloaded_results(second.result())
    assert set(one["methods"]) == {"opcm"} and set(two["methods"]) == {"magmax"}
    assert one["completed_steps"] == two["completed_steps"] == 3


def test_push_to_hub_uploads_the_merged_encoder_with_the_given_token(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id):
            calls.append(("upload", Path(path_or_fileobj).name, path_in_repo, repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = HANDLERS.workspaces.new_folder(None, "run")
    for name in ("merged-opcm.safetensors", "results.json", "config.json", "results.opcm.csv"):
        (folder / name).write_text("x")
    results = {"downloads": str(folder), "methods": {"opcm": {}}}
    message = HANDLERS.push(None, results, "opcm", "me/merged", "hf_secret")
    assert message == "Pushed the merged encoder of opcm to https://huggingface.co/me/merged"
    assert calls == [
        ("token", "hf_secret"),
        ("create", "me/merged", True),
        ("upload", "merged-opcm.safetensors", "model.safetensors", "me/merged"),
        ("upload", "results.json", "results.json", "me/merged"),
        ("upload", "config.json", "config.json", "me/merged"),
    ]
    with pytest.raises(gr.Error, match="no merged encoder of ties"):
        HANDLERS.push(None, results, "ties", "me/merged", "hf_secret")
    with pytest.raises(gr.Error, match="needs a token"):
        HANDLERS.push(None, results, "opcm", "me/merged", " ")
    with pytest.raises(gr.Error, match="as ORG/NAME"):
        HANDLERS.push(None, results, "opcm", "not a repo", "hf_secret")
    # a script cannot push another session's files, or any server folder
    other = HANDLERS.workspaces.new_folder("another-session", "run")
    for folder_given in (str(other), str(tmp_path), "/etc"):
        with pytest.raises(gr.Error, match="belong to another session"):
            HANDLERS.push(None, {"downloads": folder_given}, "opcm", "me/merged", "hf_secret")


def test_a_failure_mid_run_keeps_the_completed_steps(private_cache, monkeypatch):
    from merging.errors import CheckpointError
    from merging.methods.opcm import OPCM

    original = OPCM._merge

    def failing(self, step):
        if step.index == 3:
            raise CheckpointError(f"{step.checkpoint.name} is broken (simulated)")
        return original(self, step)

    monkeypatch.setattr(OPCM, "_merge", failing)
    updates, toast = updates_until_error(run_lab(*lab_inputs()))
    assert "mini-traffic-signs is broken (simulated)" in toast
    assert [u[0].split(" ")[0] for u in updates] == ["Checkpoints", "Reference", "Step", "Step", "**Error:**"]
    assert "mini-traffic-signs is broken (simulated)" in updates[-1][0]
    files, results = updates[-2][5:7]
    saved = json.loads(Path(next(f for f in files if f.endswith("results.json"))).read_text())
    assert saved["completed_steps"] == 2 == len(results["methods"]["opcm"]["accuracy"])


def test_a_layer_chosen_while_the_run_opens_its_checkpoints_is_checked_once_it_knows_its_encoder():
    from merging.errors import MergingError

    handlers = app.LabHandlers(hosted=False)
    live = handlers.live_layers[None] = lab.LiveLayer(None)  # what run_lab registers before the stream starts
    assert handlers.choose_layer(None, None, "not a layer") == gr.skip()
    labels = ["transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.1.mlp.c_fc.weight"]
    with pytest.raises(MergingError, match="no matrix 'not a layer' in this encoder"):
        live.bind(labels, labels[-1])
    assert handlers.choose_layer(None, None, labels[0]) == gr.skip() and live.bind(labels, labels[-1]) == labels[0]
    assert handlers.choose_layer(None, None, "") == gr.skip() and live() == labels[-1]  # bound: "" is the default
