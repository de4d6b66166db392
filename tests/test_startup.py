"""Start-up stays light: the package and the CLI's help import no heavy dependency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
HEAVY = ("ot", "gradio", "plotly", "open_clip", "pandas")


def loaded_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {(*HEAVY, 'torch')!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_library_loads_no_method_dependency_nor_ui():
    assert loaded_after("import merging") == []
    assert not set(loaded_after("import merging\nmerging.METHODS")) & set(HEAVY)  # torch only: no POT


def test_the_command_lines_help_imports_nothing_heavy():
    assert loaded_after("from merging.cli.main import main\nassert main(['--help']) == 0") == []
    done = subprocess.run([sys.executable, "-m", "merging", "--help"], cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 0 and "merge" in done.stdout and "run" in done.stdout
    done = subprocess.run([sys.executable, "-m", "merging"], cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "COMMAND" in done.stderr


def test_the_app_caps_openmp_spinning_before_torch_loads_unless_the_user_chose():
    """Idle OpenMP threads spinning for long starve other processes (benchmarks/concurrent_runs.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    probe = "import os, app; print(os.environ.get('GOMP_SPINCOUNT'))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "1000"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "None"
