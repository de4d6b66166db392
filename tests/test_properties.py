"""Property-based tests: on any input the parsers answer with success or one clear refusal, never a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import merging.cli.main
import merging.cli.run
from merging.cli.main import main
from merging.errors import MergingError
from merging.ui import lab

FLAGS = [
    "run",
    "merge",
    "--preset",
    "mini-8",
    "--checkpoint",
    "--method",
    "opcm",
    "all",
    "--opt",
    "alpha=0.5",
    "opcm.alpha=2",
    "--samples",
    "--order-seed",
    "--eval",
    "--device",
    "--out",
    "--config",
    "--pretrained",
    "--format",
    "--dtype",
    "--allow-duplicates",
    "--allow-pickle",
    "assets/mini/checkpoints/mini-digits",
    "-5",
    "0",
    "42",
    "=",
]
ARGUMENT = st.one_of(st.sampled_from(FLAGS), st.text(max_size=30))


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Parsing and every check run for real; the work itself (a run, a merge) is replaced by success."""
    monkeypatch.setenv("MERGING_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # whatever a generated --out names lands here
    monkeypatch.setattr(merging.cli.main, "run_command", lambda prepared: 0)
    monkeypatch.setattr(merging.cli.main, "run_merge", lambda args: merging.cli.main.prepare_merge(args) and 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(ARGUMENT, max_size=10))
def test_the_command_line_never_raises(no_work, capsys, argv):
    check_command_line(capsys, argv)


def test_control_characters_in_flags_still_give_one_line(no_work, capsys):
    """Found by hypothesis: argparse echoes unrecognised arguments verbatim."""
    for argv in (["run", "\n"], ["merge", "--method", "a\nb"], ["run", "--eval", "\r\n"]):
        check_command_line(capsys, argv)


def check_command_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err


LINE = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, b: f"{a}={b}", st.text(max_size=20), st.text(max_size=20)),
    st.sampled_from(["assets/mini/checkpoints/mini-digits", "org/name_mini-digits", "hf-hub:x", "upload:a"]),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(LINE, max_size=6))
@example(lines=["~\x08"])  # found by CI: Path.expanduser raised RuntimeError for a ~user with no home
@example(lines=["~nosuchuser-for-tests/x.safetensors=mini-digits"])
def test_the_checkpoint_list_parser_never_raises(lines):
    text = "\n".join(lines)
    try:
        specs = lab.parse_checkpoint_lines(text)
    except MergingError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert all(spec.source and spec.task for spec in specs)


def test_a_home_that_does_not_exist_is_a_missing_checkpoint_not_a_traceback(capsys):
    argv = ["run", "--method", "task_arithmetic", "--checkpoint", "~nosuchuser-for-tests/x.safetensors=mini-digits"]
    argv += ["--checkpoint", "assets/mini/checkpoints/mini-colors"]
    assert merging.cli.main.main(argv) != 0
    err = capsys.readouterr().err
    assert "checkpoint not found: ~nosuchuser-for-tests/x.safetensors" in err and "Traceback" not in err
