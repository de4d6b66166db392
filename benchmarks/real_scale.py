"""A TALL20-shaped continual run at ViT-B/32 scale, end to end, with the time of every phase.

    python benchmarks/real_scale.py [--quick] [--tasks 20] [--images 500] [--train-images 64]
                                    [--sizes mixed|WxH] [--methods opcm,otmf] [--otmf-steps 100]
                                    [--device auto|cpu|cuda] [--keep DIR]

What it builds (not timed): open_clip's ViT-B-32 with random weights as the backbone; one
fine-tuned checkpoint per task, written as a Hugging Face ``CLIPVisionModel`` directory like
FusionBench's (random weights plus task vectors shaped like real fine-tunes); per task a
parquet test split and train split of JPEG images. ``--sizes mixed`` gives the tasks the
resolutions of the real TALL20 test sets, from 28 × 28 digits to 800 × 600 photographs
(smooth random pictures, so file sizes are those of real JPEGs, not of noise); ``WxH`` gives
every task one size. A task registry file points the run at them (``MERGING_REGISTRY``).

What it times: the whole run as the app and ``run`` do it (reference rows, then every step
merging and evaluating the tasks seen so far), twice in the same process: in order (the
named baseline: ``ContinualRun(prefetch=False)``) and working one step ahead (the default),
each from fresh caches and with the checkpoint files dropped from the OS page cache first
(``posix_fadvise(DONTNEED)``), so both start cold. Per phase it prints the seconds spent on
the run's own thread and on the background thread: reading checkpoints, decoding images, the
network's forward passes, merging; and the critical path, the run's wall time, against the
sum of its foreground phases.

``--quick`` is the size for a 2-core CPU (3 tasks, 32 test images and 16 train images each,
OTMF with 2 mask updates per step): a few minutes per run on an idle machine. The defaults
(20 tasks, 500 test images, OTMF's 100 updates) are a GPU's job.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import VIT_B_32, realistic_task_vector
from merging.compute.devices import resolve_device

# The test images' sizes in the 20 tasks of TALL20 (typical, width × height), in registry order.
TALL20_SIZES = (
    (500, 375), (300, 240), (64, 64), (32, 32), (32, 32), (28, 28), (500, 375), (640, 480),
    (300, 225), (96, 96), (96, 96), (32, 32), (500, 400), (48, 48), (28, 28), (28, 28),
    (32, 32), (96, 96), (800, 600), (28, 28),
)  # fmt: skip
CLASSES = 10


def picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random picture: a coarse random grid upsampled, plus mild noise (JPEG-sized like a photo)."""
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_split(path: Path, count: int, size: tuple[int, int], seed: int) -> int:
    """A parquet split of ``count`` JPEGs with labels; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(count):
        buffer = io.BytesIO()
        picture(rng, *size).save(buffer, format="JPEG", quality=90)
        cells.append({"bytes": buffer.getvalue(), "path": None})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    labels = pa.array(rng.integers(0, CLASSES, count))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(cells, type=image_type), "label": labels}), path)
    return path.stat().st_size


def build(root: Path, args: argparse.Namespace) -> tuple[list[tuple[str, str]], object]:
    """Backbone, checkpoints, datasets and registry under ``root``: the (checkpoint, task) list and the backbone."""
    import open_clip

    from merging.evaluation.backbones import Backbone, Preprocess
    from merging.families.clip_vit.saving import save_encoder

    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True, load_weights=False).eval()
    backbone = Backbone("ViT-B-32 (random)", model, open_clip.get_tokenizer("ViT-B-32"), Preprocess(224), "random-b32")
    pretrained = {k: v.detach().clone() for k, v in model.visual.state_dict().items()}
    tasks, checkpoints, data_bytes = {}, [], 0
    for index in range(args.tasks):
        name = f"sim{index:02d}"
        size = TALL20_SIZES[index % len(TALL20_SIZES)] if args.sizes == "mixed" else args.fixed_size
        data_bytes += write_split(
            root / "data" / name / "data" / "test-00000-of-00001.parquet", args.images, size, index
        )
        data_bytes += write_split(
            root / "data" / name / "data" / "train-00000-of-00001.parquet", args.train_images, size, 1000 + index
        )
        tasks[name] = {
            "classnames": [f"class {c}" for c in range(CLASSES)],
            "templates": ["a photo of a {}.", "an image of a {}."],
            "dataset": {"local": str(root / "data" / name), "split": "test", "train_split": "train"},
        }
        tau = realistic_task_vector(pretrained, 100 + index)
        folder = root / "checkpoints" / f"clip-vit-base-patch32_{name}"
        save_encoder({k: pretrained[k] + tau[k] for k in pretrained}, folder, "hf", VIT_B_32, include_projection=False)
        checkpoints.append((str(folder), name))
    (root / "registry.json").write_text(json.dumps({"sets": {"sim": list(tasks)}, "tasks": tasks}))
    weights = sum(f.stat().st_size for f in (root / "checkpoints").rglob("*.safetensors"))
    print(
        f"built {args.tasks} tasks: checkpoints {weights / 2**20:,.0f} MiB, datasets {data_bytes / 2**20:,.1f} MiB "
        f"({args.images} test + {args.train_images} train JPEGs per task, sizes {args.sizes})"
    )
    return checkpoints, backbone


class PhaseClock:
    """Seconds spent in instrumented functions, per phase and per thread kind (run / background)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self._depth = threading.local()

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        self._depth.value = depth + 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:  # nested calls (a read inside a read) count once
                kind = "background" if threading.current_thread().name.startswith("merging-prefetch") else "run"
                self.seconds[(phase, kind)] += time.perf_counter() - started

    def wrap(self, owner: type, name: str, phase: str) -> Callable[[], None]:
        original = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            with clock.timing(phase):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


@contextlib.contextmanager
def instrumented(clock: PhaseClock) -> Iterator[None]:
    from merging.evaluation.datasets import ImageCache
    from merging.evaluation.evaluator import Evaluator
    from merging.io.checkpoints import EncoderReader

    undo = [
        clock.wrap(EncoderReader, "load", "read"),
        clock.wrap(EncoderReader, "__getitem__", "read"),
        clock.wrap(EncoderReader, "read_ahead", "read"),
        clock.wrap(ImageCache, "_decode", "decode"),
        clock.wrap(Evaluator, "features", "network"),
    ]
    try:
        yield
    finally:
        for restore in undo:
            restore()


def drop_from_page_cache(folder: Path) -> None:
    """Ask the OS to forget the checkpoint files' pages, so the run reads them from the disk."""
    for file in folder.rglob("*.safetensors"):
        with open(file, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_once(checkpoints, backbone, args, cache: Path, prefetch: bool, device: torch.device) -> dict[str, float]:
    from merging.experiment.runner import CheckpointSpec, ContinualRun, RunConfig

    methods = {name: ({"steps": args.otmf_steps} if name == "otmf" else {}) for name in args.methods}
    config = RunConfig(
        checkpoints=[CheckpointSpec(source, task) for source, task in checkpoints],
        methods=methods,
        samples=args.images,
        device=str(device),
    )
    clock = PhaseClock()
    with instrumented(clock):
        run = ContinualRun(config, cache_dir=cache, backbone=backbone, prefetch=prefetch)
        started = time.perf_counter()
        run.prepare()
        run.references  # noqa: B018 (the reference rows: every task decoded, every checkpoint evaluated)
        references = time.perf_counter() - started
        references_reads = clock.seconds[("read", "run")]
        for _ in run.steps():
            pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    merge = sum(s.merge_seconds for m in run.record.methods.values() for s in m.steps)
    figures = {f"{phase}/{kind}": seconds for (phase, kind), seconds in clock.seconds.items()}
    # a lazy merge reads its checkpoint tensor by tensor inside the merge: those reads are part of it
    figures.update(wall=wall, references=references, steps=wall - references, merge=merge)
    figures["merge_reads"] = figures.get("read/run", 0.0) - references_reads
    return figures


def report(rows: dict[str, dict[str, float]]) -> None:
    names = list(rows)
    print(f"\n{'seconds':<34}" + "".join(f"{n:>22}" for n in names))
    lines = [
        ("reference rows (wall)", "references"),
        ("steps (wall)", "steps"),
        ("whole run (wall): critical path", "wall"),
        ("read checkpoints, run thread", "read/run"),
        ("read checkpoints, background", "read/background"),
        ("decode images, run thread", "decode/run"),
        ("decode images, background", "decode/background"),
        ("network forward passes", "network/run"),
        ("merging (incl. its lazy reads)", "merge"),
        ("  of which reads", "merge_reads"),
    ]
    for label, key in lines:
        print(f"{label:<34}" + "".join(f"{rows[n].get(key, 0.0):22.2f}" for n in names))
    baseline, ours = rows[names[0]], rows[names[1]]
    print(
        f"\nratio: the pipelined run takes {ours['wall'] / baseline['wall']:.2f}x the in-order run's time "
        f"({baseline['wall'] / ours['wall']:.2f}x faster; baseline: {names[0]})"
    )
    for name in names:
        row = rows[name]
        foreground = row.get("network/run", 0.0) + row["merge"] + row.get("decode/run", 0.0)
        print(
            f"{name}: critical path {row['wall']:.1f} s = network {row.get('network/run', 0.0):.1f} + merging "
            f"{row['merge']:.1f} + decoding on the run's thread {row.get('decode/run', 0.0):.1f} + the rest "
            f"{row['wall'] - foreground:.1f} (references' checkpoint loads, heads, bookkeeping, waits on work ahead)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-core CPU's size: 3 tasks, 32 images, OTMF 2 updates")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--images", type=int, default=500, help="test images per task (all are evaluated)")
    parser.add_argument("--train-images", type=int, default=64, help="train images per task (OTMF's OT split)")
    parser.add_argument("--sizes", default="mixed", help="mixed (TALL20's resolutions) or WxH for every task")
    parser.add_argument("--methods", default="opcm,otmf")
    parser.add_argument("--otmf-steps", type=int, default=100)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--keep", type=Path, help="build into this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.images, args.train_images, args.otmf_steps = 3, 32, 16, 2
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.sizes != "mixed":
        width, _, height = args.sizes.partition("x")
        args.fixed_size = (int(width), int(height))
    device = resolve_device(args.device)
    root_context = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="real-")
    with root_context as root_name:
        root = Path(root_name)
        root.mkdir(parents=True, exist_ok=True)
        checkpoints, backbone = build(root, args)
        os.environ["MERGING_REGISTRY"] = str(root / "registry.json")
        print(
            f"run: {args.tasks} tasks, methods {', '.join(args.methods)} "
            f"(OTMF {args.otmf_steps} mask updates per step), "
            f"{args.images} test images per task, evaluation of the seen tasks each step, device {device}, "
            f"{torch.get_num_threads()} threads"
        )
        rows = {}
        for label, prefetch in (("in order (baseline)", False), ("one step ahead", True)):
            drop_from_page_cache(root / "checkpoints")
            rows[label] = run_once(checkpoints, backbone, args, root / f"cache-{prefetch}", prefetch, device)
            print(f"{label}: {rows[label]['wall']:.1f} s")
        report(rows)


if __name__ == "__main__":
    main()
