"""Evaluation on the CPU with glibc's malloc defaults against merging.compute.memory's settings.

    python benchmarks/malloc_tuning.py [--rounds 3]

Each measurement is a fresh process that evaluates the mini tower on 500 images in the
evaluator's CPU batches (the default run's unit of work: one task's test set), five passes in
a row as a run makes them, the best of three such rounds per pass, after a warm-up; the
baseline is the same process with ``MERGING_MALLOC_TUNING=0`` (glibc's defaults), run
alternately with the tuned one so that both see the same load. At one
thread (a sweep worker's share on two cores) and at two (a run alone). Prints seconds per 500
images and the ratio baseline / tuned, and checks the features are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import hashlib, json, sys, time
from merging.compute.memory import keep_freed_memory
tuned = keep_freed_memory()
import torch
torch.set_num_threads(int(sys.argv[1]))
from merging.evaluation.backbones import load_backbone
from merging.evaluation.datasets import normalise
from merging.evaluation.evaluator import default_batch_size
backbone = load_backbone("mini")
tower = backbone.model.visual.eval()
batch = default_batch_size(torch.device("cpu"), tower.positional_embedding.shape[0])
images = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
def features():
    return torch.cat([tower(normalise(images[i : i + batch], backbone.preprocess)) for i in range(0, 500, batch)])
with torch.no_grad():
    for _ in range(3):
        out = features()
    best = float("inf")
    for _ in range(3):  # a pass alone can miss the faults: glibc trims now and then, not every pass
        start = time.perf_counter()
        for _ in range(5):
            features()
        best = min(best, (time.perf_counter() - start) / 5)
digest = hashlib.sha1(out.numpy().tobytes()).hexdigest()
print(json.dumps({"tuned": tuned, "seconds": best, "digest": digest}))
"""


def measure(threads: int, tuned: bool) -> dict:
    env = {**os.environ, "MERGING_MALLOC_TUNING": "1" if tuned else "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads)], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        "seconds per 500 mini images (median of rounds; each the best of 3 x 5 passes in a row); load", os.getloadavg()
    )
    for threads in (1, 2):
        seconds: dict[bool, list[float]] = {False: [], True: []}
        digests = set()
        for _ in range(args.rounds):
            for tuned in (False, True):
                result = measure(threads, tuned)
                assert result["tuned"] or not tuned, "the tuning did not apply (not glibc?)"
                seconds[tuned].append(result["seconds"])
                digests.add(result["digest"])
        base, tuned = statistics.median(seconds[False]), statistics.median(seconds[True])
        print(
            f"{threads} thread(s): glibc defaults {base:.4f} s, tuned {tuned:.4f} s, "
            f"{base / tuned:.2f}x; same features: {'yes' if len(digests) == 1 else 'NO'}"
        )


if __name__ == "__main__":
    main()
