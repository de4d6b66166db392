"""``python -m merging merge`` end to end, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from merging.cli.main import main
from merging.io.checkpoints import load_encoder, open_encoder
from merging.methods import METHODS, create_merger

from .encoders import finetuned, write_hf


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["merge", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_merge(method, base, fine, **options):
    merger = create_merger(method, options)
    merger.start(load_encoder(base))
    for path in fine:
        result = merger.step(load_encoder(path))
    return result.merged


# The methods `merge` can run: every registered one that needs no task images.
DATA_FREE = [name for name, cls in METHODS.items() if not cls.requires_data]


def test_merge_command_writes_loadable_hf_directory(tmp_path, checkpoint_dirs):
    base, fine = checkpoint_dirs
    out = tmp_path / "merged"
    command = [
        sys.executable,
        "-m",
        "merging",
        "merge",
        "--method",
        "opcm",
        "--pretrained",
        str(base),
        "--out",
        str(out),
        "--opt",
        "alpha=0.6",
    ]
    for path in fine:
        command += ["--checkpoint", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"] and all("read and merged in" in s for s in steps)
    assert "lambda=" in steps[-1] and "removed=" in steps[-1]
    expected = expected_merge("opcm", base, fine, alpha=0.6)
    written = load_encoder(out)
    assert set(written) == set(expected) - {"proj"}  # CLIPVisionModel layout: no projection
    for key, value in written.items():
        torch.testing.assert_close(value, expected[key])
    transformers = pytest.importorskip("transformers")
    model = transformers.CLIPVisionModel.from_pretrained(out)
    assert model.config.num_attention_heads == 2


@pytest.mark.parametrize("method", DATA_FREE)
def test_every_method_from_the_command_line(tmp_path, capsys, checkpoint_dirs, method):
    base, fine = checkpoint_dirs
    out = tmp_path / f"{method}.safetensors"
    args = [
        "--method",
        method,
        "--pretrained",
        str(base),
        "--out",
        str(out),
        "--format",
        "open_clip",
        "--device",
        "cpu",
    ]
    for path in fine:
        args += ["--checkpoint", str(path)]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and f"wrote {out} (open_clip layout)" in stdout
    expected = expected_merge(method, base, fine)
    written = open_encoder(out)
    assert written.layout.value == "open_clip"
    for key, value in written.load().items():
        torch.testing.assert_close(value, expected[key])


def test_errors_are_one_line_with_nonzero_status(tmp_path, capsys, checkpoint_dirs):
    base, fine = checkpoint_dirs
    common = ["--pretrained", str(base), "--out", str(tmp_path / "o.safetensors")]
    cases = {
        "checkpoint not found: " + str(tmp_path / "missing"): [
            "--method",
            "opcm",
            *common,
            "--checkpoint",
            str(tmp_path / "missing"),
        ],
        "unknown option 'beta' for opcm": [
            "--method",
            "opcm",
            *common,
            "--checkpoint",
            str(fine[0]),
            "--opt",
            "beta=1",
        ],
        "option 'alpha' is not [METHOD.]KEY=VALUE": [
            "--method",
            "opcm",
            *common,
            "--checkpoint",
            str(fine[0]),
            "--opt",
            "alpha",
        ],
        "no fine-tuned checkpoints given": ["--method", "opcm", *common],
    }
    if not torch.cuda.is_available():
        cases["CUDA is not available"] = ["--method", "opcm", *common, "--checkpoint", str(fine[0]), "--device", "cuda"]
    for expected, args in cases.items():
        code, _, stderr = run_cli(capsys, *args)
        assert code == 2, expected
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and expected in stderr, stderr
        assert not (tmp_path / "o.safetensors").exists()


def test_failure_midway_keeps_the_completed_merge(tmp_path, capsys, checkpoint_dirs, pretrained_state):
    base, fine = checkpoint_dirs
    broken = finetuned(pretrained_state, 9)
    broken.pop("proj")
    broken["ln_pre.weight"] = torch.full_like(broken["ln_pre.weight"], float("inf"))
    bad = write_hf(broken, tmp_path / "broken")
    out = tmp_path / "merged.safetensors"
    code, stdout, stderr = run_cli(
        capsys,
        "--method",
        "task_arithmetic",
        "--pretrained",
        str(base),
        "--out",
        str(out),
        "--checkpoint",
        str(fine[0]),
        "--checkpoint",
        str(fine[1]),
        "--checkpoint",
        str(bad),
    )
    partial = tmp_path / "merged.partial-2of3.safetensors"
    assert code == 2 and stdout.count("step ") == 2
    assert f"checkpoint {bad} has NaN or Inf values in ln_pre.weight" in stderr and str(partial) in stderr
    assert not out.exists()
    expected = expected_merge("task_arithmetic", base, fine[:2])
    for key, value in load_encoder(partial).items():
        torch.testing.assert_close(value, expected[key])


def test_help_explains_every_flag(capsys):
    assert main(["merge", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--method",
        "--pretrained",
        "--checkpoint",
        "--out",
        "--format",
        "--opt",
        "--device",
        "--dtype",
        "--allow-pickle",
        "--allow-duplicates",
    ):
        assert flag in text
    for name in METHODS:  # a row of the methods table: the name, then its options
        assert f"\n  {name} " in text, name
    for default in ("alpha=0.5", "top_k=20.0"):
        assert default in text
