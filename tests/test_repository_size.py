"""The size budgets of issue 13: the checkout must still travel, with a few wheels, to a lent GPU
machine that takes 64 MiB in all, so assets/mini stays within 40 MiB and the tracked tree within 45."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def test_the_mini_benchmark_fits_its_budget():
    size = sum(path.stat().st_size for path in (ROOT / "assets" / "mini").rglob("*") if path.is_file())
    assert size <= 40 * MIB, f"assets/mini holds {size / MIB:.2f} MiB"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_tracked_tree_fits_its_budget():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [ROOT / name for name in listed.decode().split("\0") if name]
    size = sum(path.stat().st_size for path in paths if path.is_file())
    assert size <= 45 * MIB, f"the tracked tree holds {size / MIB:.2f} MiB"
