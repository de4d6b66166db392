"""A method added as one module, exactly as docs/ARCHITECTURE.md shows, works everywhere.

The toy method's code is read from the document itself, saved as a module in a temporary
folder, and run through the command line (found through ``MERGING_METHOD_MODULES``) and
through the lab's handlers (registered as a notebook would), with no other file changed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merging.experiment.runner import preset_checkpoints
from merging.io.checkpoints import load_encoder
from merging.methods import METHODS, ContinualMerger, create_merger

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def documented_method() -> str:
    """The Python block that follows the ``toy-method`` marker in the architecture page."""
    text = DOC.read_text()
    match = re.search(r"<!-- toy-method -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/ARCHITECTURE.md lost its worked example"
    return match.group(1)


@pytest.fixture
def toy_module(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_ema.py").write_text(documented_method())
    return folder


def cli(args, folder: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]),
        "MERGING_METHOD_MODULES": "toy_ema",
        "MERGING_CACHE": str(cache),
    }
    return subprocess.run(
        [sys.executable, "-m", "merging", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_documented_method_runs_through_the_command_line(toy_module, tmp_path):
    specs = preset_checkpoints("mini-8")[:3]
    checkpoints = [f"{s.source}={s.task}" for s in specs]
    args = ["run", "--backbone", "mini", "--method", "ema", "--opt", "beta=0.3", "--samples", "32", "--device", "cpu"]
    for checkpoint in checkpoints:
        args += ["--checkpoint", checkpoint]
    out = tmp_path / "results.json"
    done = cli([*args, "--out", str(out)], toy_module, tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    ema = results["methods"]["ema"]
    assert ema["options"] == {"beta": 0.3} and len(ema["accuracy"]) == 3
    assert [s["diagnostics"]["beta_used"] for s in ema["steps"]] == [1.0, 0.3, 0.3]

    # merge: the written encoder is θ1, then lerp towards θ2 and θ3 by β
    merged_path = tmp_path / "merged.safetensors"
    base = ROOT / "assets" / "mini" / "base"
    done = cli(
        ["merge", "--method", "ema", "--opt", "beta=0.25", "--pretrained", str(base)]
        + [arg for s in specs for arg in ("--checkpoint", s.source)]
        + ["--out", str(merged_path), "--format", "open_clip"],
        toy_module,
        tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr
    states = [load_encoder(s.source) for s in specs]
    merged = load_encoder(merged_path)
    key = next(k for k in merged if k.endswith("mlp.c_fc.weight"))
    expected = states[0][key].float().lerp(states[1][key].float(), 0.25).lerp(states[2][key].float(), 0.25)
    # the output keeps the checkpoints' dtype (the mini's are float16): compare at that precision
    torch.testing.assert_close(merged[key], expected.to(merged[key].dtype))

    # a bad option value is refused in one line, naming the method and the option
    done = cli([*args, "--opt", "beta=2", "--out", str(tmp_path / "bad.json")], toy_module, tmp_path / "cache")
    assert done.returncode == 2 and "ema option beta=2 is out of range" in done.stderr


def test_the_documented_method_runs_through_the_lab_handlers(toy_module, tmp_path, monkeypatch):
    import app
    from merging.ui import lab

    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("toy_ema", toy_module / "toy_ema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = METHODS.register(module.TaskVectorEMA)
    try:
        assert issubclass(cls, ContinualMerger) and "ema" in METHODS
        values = [
            0.4 if (m, o) == ("ema", "beta") else next(x.default for x in METHODS[m].options if x.name == o)
            for m, o in lab.option_fields()
        ]
        checkpoints = "\n".join(lab.preset_text("mini-8", "mini").splitlines()[:3])
        handlers = app.LabHandlers(hosted=False)
        inputs = ["mini", "mini-8", checkpoints, ["ema", "task_arithmetic"], 32, "seen", "cpu", None, "hf", False]
        updates = list(handlers.run_lab(None, *inputs, *values))
        final = app.RunView(*updates[-1])
        assert final.status.startswith("Step 3/3")
        results = final.results
        assert list(results["methods"]) == ["ema", "task_arithmetic"]
        assert results["methods"]["ema"]["options"] == {"beta": 0.4}
        assert [s["diagnostics"]["beta_used"] for s in results["methods"]["ema"]["steps"]] == [1.0, 0.4, 0.4]
        assert final.internals["label"] == cls.figure_title
        assert list(final.internals["value"].data[0].y) == [1.0, 0.4, 0.4]
        assert cls.title in app.explanations() and cls.explanation in app.explanations()
        # the same step in memory: a merger built by name merges as the run did
        merger = create_merger("ema", {"beta": 0.4})
        assert merger.config == {"beta": 0.4}
    finally:
        METHODS.unregister("ema")
    assert "ema" not in METHODS


def test_a_method_that_reports_undeclared_diagnostics_fails_loudly():
    from merging.methods import Option, StepInput

    class Sloppy(ContinualMerger):
        name = "sloppy"
        title = "Sloppy"
        summary = "reports a diagnostic it does not declare"
        options: tuple[Option, ...] = ()

        def _merge(self, step: StepInput):
            return {"surprise": 1.0}

    merger = Sloppy()
    merger.start({"w": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="does not declare"):
        merger.step({"w": torch.ones(2, 2)})


def test_a_plugin_that_fails_to_import_is_named_and_the_registry_is_not_left_half_loaded(monkeypatch):
    from merging.errors import OptionError
    from merging.methods import MethodRegistry

    registry = MethodRegistry()
    monkeypatch.setenv("MERGING_METHOD_MODULES", "no_such_method_module")
    with pytest.raises(OptionError, match="cannot import method module 'no_such_method_module'"):
        list(registry)
    monkeypatch.delenv("MERGING_METHOD_MODULES")
    assert list(registry) == list(METHODS)  # retried on the next use, complete
