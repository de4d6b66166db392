"""The default command-line run as a whole process, against a baseline revision in the same run.

    python benchmarks/cli_cold_run.py [--baseline d05417d] [--repeat 3]

Times ``python -m merging run --preset mini-8 --method opcm`` from an empty ``MERGING_CACHE``
(cold: imports, backbone, decoding, zero-shot heads, reference rows, eight steps) and again
with that cache filled (warm), plus ``python -m merging --help``, each as a fresh process from
command to exit. The baseline is the same commands in a temporary ``git worktree`` of
``--baseline`` (default ``d05417d``: before the run stopped importing open_clip and torchvision
and before the CPU evaluation batch shrank), run alternately with the current checkout so
that both see the same machine load; the median of ``--repeat`` runs is printed with the
ratio. Both must print the same ACC and BWT. Issue 16's target: cold ≤ 8 s on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sweep import command, load  # noqa: E402 (after the checkout is importable)

COLD_TARGET = 8.0
RUN = ("run", "--preset", "mini-8", "--method", "opcm")


def timed(checkout: Path, args: tuple[str, ...], cache: Path, out: Path) -> tuple[float, str]:
    """Seconds from command to exit of ``python -m merging ARGS`` in ``checkout``, and the result line."""
    env = {**os.environ, "MERGING_CACHE": str(cache)}
    if args[:1] == ("run",):
        args = (*args, "--out", str(out))
    seconds, stdout = command(*args, env=env, checkout=checkout)
    result = next((line for line in stdout.splitlines() if line.strip().startswith("opcm")), "")
    return seconds, " ".join(result.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="d05417d", help="the revision to compare with")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        baseline = scratch / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(baseline), args.baseline],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            sides = {f"baseline {args.baseline}": baseline, "this checkout": ROOT}
            times: dict[str, dict[str, list[float]]] = {side: {"cold": [], "warm": [], "help": []} for side in sides}
            results: dict[str, set[str]] = {side: set() for side in sides}
            for repeat in range(args.repeat):
                for side, checkout in sides.items():
                    cache = scratch / f"cache-{repeat}-{side.split()[0]}"
                    out = scratch / "results.json"
                    for kind in ("cold", "warm"):
                        seconds, result = timed(checkout, RUN, cache, out)
                        times[side][kind].append(seconds)
                        results[side].add(result)
                    times[side]["help"].append(timed(checkout, ("--help",), cache, out)[0])
                    shutil.rmtree(cache, ignore_errors=True)
                    print(
                        f"  {side}, repeat {repeat + 1}: cold {times[side]['cold'][-1]:.2f} s, "
                        f"warm {times[side]['warm'][-1]:.2f} s, --help {times[side]['help'][-1]:.2f} s ({load()})",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
    base, ours = (times[side] for side in sides)
    print(f"\nmedian of {args.repeat}, python -m merging {' '.join(RUN)} as a whole process:")
    print(f"{'':10} {'baseline':>10} {'this':>10} {'ratio':>7}")
    for kind in ("cold", "warm", "help"):
        b, o = statistics.median(base[kind]), statistics.median(ours[kind])
        print(f"{kind:10} {b:9.2f}s {o:9.2f}s {b / o:6.2f}x")
    cold = statistics.median(ours["cold"])
    print(f"cold target {COLD_TARGET:.0f} s: {'met' if cold <= COLD_TARGET else 'missed'} ({cold:.2f} s)")
    same = len(set().union(*results.values())) == 1
    print("same ACC and BWT on both sides:", "yes" if same else f"NO: {results}")


if __name__ == "__main__":
    main()
