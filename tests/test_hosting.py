"""Hosted mode: what visitors may read, where the lab writes, and each session's files kept apart."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import gradio as gr
import pytest

import app
from merging.errors import MergingError
from merging.evaluation.tasks import ASSETS
from merging.ui import lab
from merging.ui.hosting import SourcePolicy, Workspaces, hosted_mode, safe_upload_name

from .test_app import OPTION_DEFAULTS, SAMPLES, lab_inputs, updates_until_error

DIGITS = ASSETS / "mini" / "checkpoints" / "mini-digits"


class Session:
    """What gr.Request gives a handler: the session's id."""

    def __init__(self, session_hash: str):
        self.session_hash = session_hash


@pytest.fixture
def hosted(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "cache"))
    return app.LabHandlers(hosted=True, workspaces=Workspaces(tmp_path / "sessions"))


def test_hosted_mode_comes_from_the_flag_or_the_spaces_environment(monkeypatch):
    monkeypatch.delenv("MERGING_HOSTED", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not hosted_mode()
    monkeypatch.setenv("SPACE_ID", "someone/lab")
    assert hosted_mode()
    monkeypatch.setenv("MERGING_HOSTED", "0")
    assert not hosted_mode()
    monkeypatch.setenv("MERGING_HOSTED", "maybe")
    with pytest.raises(MergingError, match="MERGING_HOSTED='maybe' must be 1 or 0"):
        hosted_mode()


def test_hosted_policy_reads_only_assets_hub_ids_and_uploads(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "mine.safetensors").write_bytes(b"x")
    policy = SourcePolicy(hosted=True, uploads=uploads)
    assert policy.checkpoint("assets/mini/checkpoints/mini-digits") == str(DIGITS)
    assert policy.checkpoint(str(DIGITS)) == str(DIGITS)
    assert policy.checkpoint("upload:mine.safetensors") == str(uploads / "mine.safetensors")
    assert policy.checkpoint("tanganke/clip-vit-base-patch32_svhn") == "hf-hub:tanganke/clip-vit-base-patch32_svhn"
    assert policy.checkpoint("hf-hub:org/name@v1") == "hf-hub:org/name@v1"
    link = ASSETS.parent / "tests" / "_outside_link"
    for refused in ("/etc/passwd", "assets/../../etc", "~/secrets", str(tmp_path), "/etc"):
        with pytest.raises(MergingError, match="server paths cannot be read on this hosted lab"):
            policy.checkpoint(refused)
    try:
        link.symlink_to("/etc")
        with pytest.raises(MergingError, match="server paths cannot be read"):
            policy.checkpoint(f"{link}/passwd")
    finally:
        link.unlink(missing_ok=True)
    for name, message in (
        ("upload:../x", "not an uploaded file name"),
        ("upload:/etc/passwd", "not an uploaded file name"),
        ("upload:other.safetensors", "no uploaded file 'other.safetensors'"),
    ):
        with pytest.raises(MergingError, match=message):
            policy.checkpoint(name)
    with pytest.raises(MergingError, match="server paths cannot be read"):
        policy.backbone("local-dir:/etc")
    assert policy.backbone("local-dir:assets/mini/base") == f"local-dir:{ASSETS / 'mini' / 'base'}"
    assert policy.backbone("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    local = SourcePolicy(hosted=False)
    assert local.checkpoint(str(tmp_path)) == str(tmp_path)  # outside hosted mode, paths work as on the CLI


def test_a_hosted_run_refuses_server_paths_in_one_line(hosted, caplog):
    caplog.set_level(logging.INFO, logger="merging.app")
    for checkpoints, message in (
        ("/etc/passwd=mini-digits", "server paths cannot be read on this hosted lab: '/etc/passwd'"),
        ("../../etc=mini-digits", "server paths cannot be read"),
    ):
        updates, _ = updates_until_error(hosted.run_lab(Session("a"), *lab_inputs(checkpoints=checkpoints)))
        assert len(updates) == 1 and updates[0][0].startswith("**Error:**") and message in updates[0][0]
    bad_backbone = lab_inputs(checkpoints=f"{DIGITS}=mini-digits")
    bad_backbone[0] = "local-dir:/etc"
    assert "server paths cannot be read" in next(iter(hosted.run_lab(Session("a"), *bad_backbone)))[0]
    too_many = lab_inputs(samples=10**9)
    assert "between 16 and 2000" in next(iter(hosted.run_lab(Session("a"), *too_many)))[0]
    assert all(r.getMessage().startswith("user error: ") and "\n" not in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


def test_every_run_writes_only_to_its_sessions_folder(hosted):
    three = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:3])
    first = list(hosted.run_lab(Session("alice"), *lab_inputs(checkpoints=three)))[-1]
    second = list(hosted.run_lab(Session("bob"), *lab_inputs(checkpoints=three)))[-1]
    alice, bob = (Path(update[6]["downloads"]) for update in (first, second))
    assert alice != bob and alice.parent != bob.parent
    assert hosted.workspaces.owns("alice", alice) and not hosted.workspaces.owns("alice", bob)
    assert all(Path(f).parent == alice for f in first[5]) and all(Path(f).parent == bob for f in second[5])
    assert alice.is_relative_to(hosted.workspaces.root)
    saved = json.loads((alice / "config.json").read_text())["config"]
    assert saved["checkpoints"][0]["source"] == "assets/mini/checkpoints/mini-land-cover"  # replayable anywhere
    with pytest.raises(gr.Error, match="belong to another session"):  # bob's state cannot read alice's files
        hosted.analyse(Session("bob"), first[6], "")
    hosted.end_session(Session("alice"))
    assert not alice.exists() and bob.exists()


def test_workspaces_bound_runs_and_idle_sessions(tmp_path):
    spaces = Workspaces(tmp_path / "root", ttl_hours=1, max_runs=2)
    runs = [spaces.new_folder("s", "run") for _ in range(3)]
    assert [r.exists() for r in runs] == [False, True, True]
    idle = spaces.folder("idle")
    old = time.time() - 2 * 3600
    os.utime(idle, (old, old))
    spaces.folder("active")  # any use sweeps sessions idle for longer than the time to live
    assert not idle.exists() and runs[-1].exists()
    assert spaces.folder("../../etc").parent == spaces.root  # session ids are hashed, never path components
    spaces.close()
    assert not spaces.root.exists()


def test_uploads_are_checked_capped_and_kept_per_session(hosted, tmp_path, monkeypatch):
    upload_dir = tmp_path / "gradio-uploads"
    upload_dir.mkdir()
    monkeypatch.setattr(app, "get_upload_folder", lambda: str(upload_dir))
    good = upload_dir / "clip-mini_mini-digits.safetensors"
    good.write_bytes((DIGITS / "model.safetensors").read_bytes())
    text = hosted.add_uploads(Session("a"), [str(good)], "")
    assert text == "upload:clip-mini_mini-digits.safetensors=mini-digits"
    config = lab.LabRequest(checkpoints=text).config(hosted.policy(Session("a")))
    assert Path(config.checkpoints[0].source).parent == hosted.workspaces.uploads("a")
    with pytest.raises(MergingError, match="no uploaded file"):  # another session cannot name it
        lab.LabRequest(checkpoints=text).config(hosted.policy(Session("b")))
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(good.read_bytes())
    with pytest.raises(gr.Error, match="only files uploaded through the page"):
        hosted.add_uploads(Session("a"), [str(outside)], "")
    broken = upload_dir / "broken_mini-digits.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(gr.Error, match=r"upload broken_mini-digits\.safetensors: corrupt checkpoint"):
        hosted.add_uploads(Session("a"), [str(broken)], "")
    assert not (hosted.workspaces.uploads("a") / broken.name).exists()
    pickle = upload_dir / "model.bin"
    pickle.write_bytes(b"x")
    with pytest.raises(gr.Error, match=r"only \.safetensors checkpoints"):
        hosted.add_uploads(Session("a"), [str(pickle)], "")
    monkeypatch.setenv("MERGING_MAX_UPLOAD_MB", "0.5")  # the mini checkpoints are ~0.9 MiB
    with pytest.raises(gr.Error, match=r"is \d+\.\d MiB, over the 0\.5 MiB upload limit"):
        hosted.add_uploads(Session("a"), [str(good)], "")
    unnamed = upload_dir / "weights.safetensors"
    unnamed.write_bytes(good.read_bytes())
    monkeypatch.delenv("MERGING_MAX_UPLOAD_MB")
    with pytest.raises(gr.Error, match=r"add the line upload:weights\.safetensors=TASK"):
        hosted.add_uploads(Session("a"), [str(unnamed)], "")
    assert hosted.add_merge_uploads(Session("a"), [str(unnamed)], "x") == "x\nupload:weights.safetensors"
    assert safe_upload_name("../../a b?.safetensors") == "a_b_.safetensors"


def test_the_merge_page_writes_no_visitor_path_and_offers_its_encoder(hosted):
    updates = list(
        hosted.merge_checkpoints(
            Session("m"), "opcm", "assets/mini/base", "assets/mini/checkpoints/mini-letters", "", "cpu", "hf", False
        )
    )
    files, folder = updates[-1][1:]
    assert hosted.workspaces.owns("m", folder) and {Path(f).name for f in files} == {"model.safetensors", "config.json"}
    with pytest.raises(gr.Error, match="server paths cannot be read"):
        list(hosted.merge_checkpoints(Session("m"), "opcm", "/etc", str(DIGITS), "", "cpu", "hf", False))
    with pytest.raises(gr.Error, match="nothing to push yet"):
        hosted.push_merge(Session("m"), None, "me/x", "token")
    with pytest.raises(gr.Error, match="belong to another session"):
        hosted.push_merge(Session("other"), folder, "me/x", "token")


def test_handlers_validate_whatever_a_script_sends(hosted):
    session = Session("s")
    cases = [
        (lab_inputs(methods=("nosuch",)), "unknown method 'nosuch'"),
        (lab_inputs(samples=17.5), "test images per task must be a whole number"),
    ]
    for position, value, message in (
        (3, "opcm", "methods must be a list"),
        (5, "sometimes", "evaluate tasks must be one of seen, all"),
        (8, "../../x", "merged encoder layout must be one of hf, open_clip"),
        (7, "42; rm", "order seed must be a whole number"),
    ):
        inputs = lab_inputs()
        inputs[position] = value
        cases.append((inputs, message))
    alpha = next(i for i, (m, o) in enumerate(lab.option_fields()) if (m, o) == ("opcm", "alpha"))
    options = list(OPTION_DEFAULTS)
    options[alpha] = 2
    cases.append((lab_inputs(options=options), "opcm option alpha=2 is out of range: must be a number in [0, 1]"))
    options[alpha] = {"nested": []}
    cases.append((lab_inputs(options=options), "opcm option alpha"))
    cases.append((lab_inputs()[:-1], "option values"))
    for inputs, message in cases:
        updates, _ = updates_until_error(hosted.run_lab(session, *inputs))
        assert len(updates) == 1 and message in updates[0][0], (message, updates[0][0])
    with pytest.raises(gr.Error, match="action must be one of"):
        hosted.edit_list("", "explode", 1, "")
    with pytest.raises(gr.Error, match="row must be a whole number"):
        hosted.edit_list("", "up", "1; drop", "")
    assert SAMPLES >= 16


def test_stop_says_stopped_and_what_is_kept():
    assert "Stopped before the first step" in app.LabHandlers(hosted=False).stopped(None)
    from merging.experiment.results import MethodResults, RunResults, StepRecord

    tasks = ["a", "b", "c"]
    steps = [StepRecord(dict.fromkeys(tasks[: t + 1], 0.5), 0.1, 0.1, None, None, {}) for t in range(2)]
    results = RunResults({}, tasks, {"opcm": MethodResults("opcm", {}, tasks, steps)}).to_json()
    message = app.LabHandlers(hosted=False).stopped(results)
    assert message.startswith("Stopped after step 2 of 3") and "stay in the downloads" in message
