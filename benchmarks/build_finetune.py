"""The mini benchmark build's fine-tuning: one-thread workers side by side against one task after another.

    python benchmarks/build_finetune.py [--tasks 4] [--steps 300] [--threads 2]

Named baseline measured in the same run: the build's former way, each task's fine-tune in the
build's process on ``--threads`` threads, one after another. Against it, ``build.finetune_tasks``
with as many one-thread workers as threads (what ``--finetune-workers`` defaults to). Both
fine-tune the shipped base's image tower with the build's recipe, shortened to ``--steps``
steps, on random 32 × 32 images (the time does not depend on what they show), toward a random
10-class head; each includes its copy of the tower and a test pass over 500 images, as in the
build. Prints seconds per task and the ratio baseline / workers; checks that the workers' weights
equal one-thread fine-tunes run in the process (the build's weights do not depend on the workers).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.minibench import build

BASE = Path(__file__).resolve().parents[1] / "assets" / "mini" / "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from safetensors.torch import load_file

    config = build.model_config()
    model, _ = build.create_model(Path(f"/tmp/build-finetune-bench-{args.threads}"), config)
    model.load_state_dict(load_file(str(BASE / "open_clip_model.safetensors")))
    visual = model.visual.eval()
    logit_scale = float(model.logit_scale.detach().exp())
    generator = torch.Generator().manual_seed(0)
    names = [spec.name for spec in build.TASKS[: args.tasks]]
    data = {
        name: (
            torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8, generator=generator),
            np.arange(2000) % 10,
        )
        for name in names
    }
    test = {name: (images[:500], labels[:500]) for name, (images, labels) in data.items()}
    heads = {name: torch.nn.functional.normalize(torch.randn(10, 64, generator=generator), dim=-1) for name in names}
    recipe = build.parse_recipe(f"steps={args.steps}")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    for index, name in enumerate(names):
        tower = copy.deepcopy(visual)
        torch.manual_seed(index)
        build.finetune(tower, heads[name], logit_scale, *data[name], recipe, index)
        build.accuracy(tower, heads[name], *test[name])
    baseline = (time.perf_counter() - started) / len(names)

    started = time.perf_counter()
    parallel = {
        i: state
        for i, _, state in build.finetune_tasks(visual, heads, logit_scale, data, test, recipe, 0, args.threads)
    }
    workers = (time.perf_counter() - started) / len(names)

    alone = {i: state for i, _, state in build.finetune_tasks(visual, heads, logit_scale, data, test, recipe, 0, 1)}
    same = all(torch.equal(alone[i][k], parallel[i][k]) for i in alone for k in alone[i])
    print(f"{len(names)} tasks × {args.steps} steps of the mini tower's fine-tuning, {args.threads} cores")
    print(f"baseline, one after another on {args.threads} threads: {baseline:.1f} s per task")
    print(f"{args.threads} one-thread workers side by side:       {workers:.1f} s per task")
    print(f"ratio baseline / workers: {baseline / workers:.2f}; workers' weights equal one-thread ones: {same}")


if __name__ == "__main__":
    main()
