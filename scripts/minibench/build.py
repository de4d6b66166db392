"""Build the embedded mini benchmark: a tiny CLIP, twelve tasks, and a fine-tuned encoder per task.

    python scripts/build_mini_benchmark.py [--seed 0] [--out assets/mini]

Deterministic for its seed on a given machine (torch and Pillow versions fixed). Steps:

1. Draw each task's test split (500 images) and a labelled train split (100 per class) with the
   generators, and write them as parquet in the Hub layout (``datasets/<task>/data/``). The
   benchmark's own images of the low-resolution tasks are captured at 16 px and upscaled, as
   MNIST, SVHN, GTSRB and EuroSAT are upscaled to CLIP's input size.
2. Pretrain a tiny CLIP (open_clip architecture, registered through its own config file)
   contrastively with open_clip's ``ClipLoss`` on captioned "web" images: the same concepts
   in a shifted style, with some captions naming the wrong class, as web captions do.
3. Fine-tune the image encoder per task on freshly drawn images with the task's zero-shot
   head frozen (as FusionBench fine-tunes; the projection is frozen as CLIPVisionModel has
   none; AdamW with the weight decay per step of Ilharco et al.'s recipe), and save it in float16 in the
   Hugging Face CLIPVisionModel layout with a config.json.
4. Write the task registry (``tasks.json``) and the checkpoints' provenance.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from merging.evaluation.backbones import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from merging.families.clip_vit.architecture import VisionArch  # noqa: E402
from merging.families.clip_vit.saving import save_encoder  # noqa: E402
from scripts.minibench.generators import (  # noqa: E402
    TASKS,
    TaskSpec,
    acquire,
    digit_split,
    draw_handwritten_digit,
)

TEST_SIZE = 500
# Labelled train images per class: OTMF tunes heads on 25 % of the train split, so this gives
# 25 per class, within the range of the real train splits (25 % of Stanford Cars is ~10 per
# class, of DTD ~20, of RESISC45 ~105, of EuroSAT ~540).
TRAIN_PER_CLASS = 100
FINETUNE_SIZE = 10000
PRETRAIN_PER_TASK = 3000
TASK_STYLE_IN_PRETRAINING = 0.3  # share of pretraining images drawn in the benchmark's own style
# Concepts no task asks about, in the pretraining corpus (scripts/minibench/concepts.py), and
# the captioned images drawn of each.
OTHER_CONCEPTS = 0
OTHER_IMAGES_PER_CONCEPT = 100
JPEG_QUALITY = 90
# How the base's text tower is stored. It only yields the zero-shot heads, which the build
# computes from the stored (rounded) weights, so the fine-tunes train against exactly the heads
# a loader computes. Most of the base is open_clip's 49,408-row token embedding, fixed by its
# tokenizer: in float32 the base is 10.2 MB, over the repository's 8 MB per-file rule; in
# float16 it is 7.0 MB (``--text-tower-dtype float32`` keeps the full precision). The image
# tower is always float32, so that task vectors are computed against the exact θ0.
TEXT_TOWER_DTYPE = torch.float16
TEXT_TOWER_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Fine-tuned encoders are stored in float16 to fit the repository's size budget. The rounding
# perturbs each task vector by well under 1 % of its norm (measured by the build:
# storage_rounding in build_report.json); the base stays float32,
# so task vectors are computed against the exact pretrained weights.
CHECKPOINT_DTYPE = torch.float16
# The fine-tuning recipe (``--recipe key=value,...`` overrides it) is FusionBench's for the
# tanganke/clip-vit-*_<task> checkpoints behind the published continual numbers (their model
# cards: constant lr, 4,000 steps of 32, no weight decay; AdamW here), at a 20× larger learning
# rate than their 1e-5 so that the tiny tower's task vectors reach real ones' relative size.
# The strength is a trade-off (docs/mini-realism.md): stronger fine-tunes make OPCM's projection
# worth more but let task arithmetic fall behind weight averaging, and lr 2e-4 on the 192-wide,
# 60-epoch base gave OPCM its largest lead of the sixteen fine-tune sets measured there.
# ``schedule=onecycle`` or ``cosine`` with ``epochs=N,steps=0`` and ``wd_per_step=1e-6`` gives
# Ilharco et al.'s style of recipe, which earlier builds shipped.
FINETUNE_LR = 2e-4
SCHEDULES = ("onecycle", "cosine", "constant")
FINETUNE_RECIPE: dict[str, object] = {
    "lr": FINETUNE_LR,
    "epochs": 10,  # passes over FINETUNE_SIZE images, used only when steps is 0
    "wd_per_step": 0.0,  # AdamW's decoupled shrinkage of θ0 per step, lr · wd
    "schedule": "constant",  # or "onecycle" (10 % warm-up), or "cosine" (linear warm-up, then cosine decay)
    "steps": 4000,  # optimiser steps; 0: epochs × images / batch
    "warmup": 0.1,
    "batch": 32,
}
# The image tower the build pretrains: 192 wide and 2 blocks deep (the first builds' 96 × 4 made
# OPCM's lead half as large at the same cost, docs/mini-realism.md), for PRETRAIN_EPOCHS passes.
VISION_WIDTH = 192
VISION_LAYERS = 2
PRETRAIN_EPOCHS = 60
MINI_8 = (
    "mini-land-cover",
    "mini-house-numbers",
    "mini-traffic-signs",
    "mini-digits",
    "mini-textures",
    "mini-letters",
    "mini-shapes",
    "mini-colors",
)
MODEL_CONFIG = {
    "model_cfg": {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 32,
            "layers": VISION_LAYERS,
            "width": VISION_WIDTH,
            "head_width": 16,
            "mlp_ratio": 4.0,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}
GENERIC_CAPTIONS = ("{}.", "a picture of {}.", "an image showing {}.")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ data


def drawer(spec: TaskSpec, pool: np.ndarray | None):
    if spec.draw is draw_handwritten_digit:
        return lambda rng, label, domain: draw_handwritten_digit(rng, label, domain, pool)
    return spec.draw


def draw_split(
    spec: TaskSpec,
    domain: str,
    size: int,
    seed: int,
    pool: np.ndarray | None = None,
    task_style: float = TASK_STYLE_IN_PRETRAINING,
):
    """``size`` images with balanced, shuffled labels, from a generator seeded by ``seed``.

    Every image goes through the JPEG round trip it gets when stored, so what the models
    train on looks exactly like what the benchmark ships. In the ``web`` domain a share of
    the images (``task_style``) is drawn in the task's own style, as some web images resemble a
    benchmark.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(size) % len(spec.classnames)
    rng.shuffle(labels)
    draw = drawer(spec, pool)
    images = []
    for label in labels:
        style = "task" if domain == "web" and rng.random() < task_style else domain
        image = draw(rng, int(label), style)
        if domain == "task":  # the benchmark's own images, captured at the task's resolution
            image = acquire(image, spec.native)
        images.append(Image.open(io.BytesIO(jpeg(image))).convert("RGB"))
    return images, labels.astype(np.int64)


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def draw_task(
    index: int,
    seed: int,
    noise: float,
    task_style: float = TASK_STYLE_IN_PRETRAINING,
    pretrain_size: int = PRETRAIN_PER_TASK,
):
    """All images of task ``index``: test, train, fine-tuning, and captioned pretraining images.

    Every split has its own seeded generator, so the result does not depend on which worker
    process draws it.
    """
    spec = TASKS[index]
    pools = dict(zip(("test", "train"), digit_split(TEST_SIZE, seed), strict=True))

    def pool(split: str):
        return pools[split] if spec.name == "mini-digits" else None

    test = draw_split(spec, "task", TEST_SIZE, seed * 1000 + index * 10 + 1, pool("test"))
    train_size = TRAIN_PER_CLASS * len(spec.classnames)
    train = draw_split(spec, "task", train_size, seed * 1000 + index * 10 + 2, pool("train"))
    tune = draw_split(spec, "task", FINETUNE_SIZE, seed * 1000 + index * 10 + 3, pool("train"))
    web_seed = seed * 1000 + index * 10 + 4
    web_images, web_labels = draw_split(spec, "web", pretrain_size, web_seed, pool("train"), task_style)
    rng = np.random.default_rng(seed * 1000 + index * 10 + 5)
    templates = spec.templates + GENERIC_CAPTIONS
    captions = []
    for label in web_labels:
        named = int(rng.integers(len(spec.classnames))) if rng.random() < noise else int(label)
        captions.append(templates[int(rng.integers(len(templates)))].format(spec.classnames[named]))
    log(f"drew {spec.name}: {len(spec.classnames)} classes")
    return test, train, tune, web_images, captions


def write_parquet(path: Path, images: list[Image.Image], labels: np.ndarray, task: str, split: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images_array = pa.array(
        [{"bytes": jpeg(im), "path": f"{task}-{split}-{i:05d}.jpg"} for i, im in enumerate(images)], type=image_type
    )
    table = pa.table({"image": images_array, "label": pa.array(labels, type=pa.int64())})
    pq.write_table(table, path, compression="zstd")


def normalise(batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


# ------------------------------------------------------------------ models


def model_config(width: int = VISION_WIDTH, layers: int = VISION_LAYERS, embed_dim: int = 64) -> dict:
    """MODEL_CONFIG with another image-tower width and depth (heads stay 16 wide) and embedding size.

    The width sets how much room the fine-tunes have: a task matrix of the shipped tower uses
    a fifth to two fifths of its 192 directions (``scripts/minibench/diagnose.py``).
    """
    config = json.loads(json.dumps(MODEL_CONFIG))
    config["model_cfg"]["vision_cfg"].update(width=width, layers=layers)
    config["model_cfg"]["embed_dim"] = embed_dim
    return config


def create_model(base: Path, config: dict = MODEL_CONFIG):
    import open_clip

    base.mkdir(parents=True, exist_ok=True)
    (base / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    model = open_clip.create_model(f"local-dir:{base}", load_weights=False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{base}")
    return model, tokenizer


def pretrain(model, tokenizer, corpus: list[tuple[torch.Tensor, list[str]]], epochs: int, seed: int) -> None:
    """Contrastive pretraining with open_clip's loss on (images, captions) of every task."""
    from open_clip.loss import ClipLoss

    images = torch.cat([x for x, _ in corpus])
    captions = [c for _, caps in corpus for c in caps]
    unique = sorted(set(captions))
    tokens = tokenizer(unique)
    caption_index = torch.tensor([unique.index(c) for c in captions]) if len(unique) < 5000 else None
    if caption_index is None:
        lookup = {c: i for i, c in enumerate(unique)}
        caption_index = torch.tensor([lookup[c] for c in captions])
    loss_fn = ClipLoss()
    batch_size = 256
    steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch_captions = caption_index[index]
            present, inverse = torch.unique(batch_captions, return_inverse=True)
            text = model.encode_text(tokens[present], normalize=True)[inverse]
            image = model.encode_image(normalise(images[index]), normalize=True)
            loss = loss_fn(image, text, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            total += float(loss) * len(index)
            step += 1
        log(f"pretraining epoch {epoch + 1}/{epochs}: loss {total / len(images):.3f}")
    model.eval()


@torch.no_grad()
def zeroshot_head(model, tokenizer, spec: TaskSpec) -> torch.Tensor:
    rows = []
    for name in spec.classnames:
        embeddings = F.normalize(model.encode_text(tokenizer([t.format(name) for t in spec.templates])), dim=-1)
        rows.append(F.normalize(embeddings.mean(0), dim=0))
    return torch.stack(rows)


@torch.no_grad()
def accuracy(visual, head: torch.Tensor, images: torch.Tensor, labels: np.ndarray) -> float:
    visual.eval()
    features = F.normalize(visual(normalise(images)), dim=-1)
    return float(((features @ head.T).argmax(-1).numpy() == labels).mean())


def parse_recipe(text: str, defaults: Mapping[str, object] | None = None) -> dict:
    """``key=value,...`` over ``defaults`` (FINETUNE_RECIPE): each value takes its default's type."""
    recipe = dict(FINETUNE_RECIPE if defaults is None else defaults)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in recipe:
            raise SystemExit(f"unknown recipe key {key!r}; known: {', '.join(recipe)}")
        recipe[key] = float(value) if isinstance(recipe[key], float) else type(recipe[key])(value)
    if recipe["schedule"] not in SCHEDULES:
        raise SystemExit(f"unknown schedule {recipe['schedule']!r}; known: {', '.join(SCHEDULES)}")
    return recipe


def describe_recipe(recipe: Mapping[str, object]) -> str:
    """The recipe in words, for the report: 'AdamW, constant lr 0.0002, 4,000 steps of 32, no weight decay'."""
    lr, steps = float(recipe["lr"]), int(recipe["steps"])
    batch = recipe["batch"]
    length = f"{steps:,} steps of {batch}" if steps else f"{recipe['epochs']} epochs in batches of {batch}"
    names = {"onecycle": "one-cycle", "cosine": "warm-up and cosine", "constant": "constant"}
    schedule = names[str(recipe["schedule"])]
    per_step = float(recipe["wd_per_step"])
    real = ", as in the real recipe" if math.isclose(per_step, 1e-6) else ""
    decay = f"weight decay {per_step / lr:g} (lr · wd = {per_step:.0e} per step{real})"
    if not per_step:
        decay = "no weight decay"
    return f"AdamW, {schedule} lr {lr:g}, {length}, {decay}"


def finetune(visual, head, logit_scale: float, images: torch.Tensor, labels: np.ndarray, recipe: Mapping, seed: int):
    """Cross-entropy on the frozen zero-shot head; only the image tower trains, not its projection.

    ``recipe`` (FINETUNE_RECIPE's keys) sets AdamW's learning rate, its weight decay as the shrinkage
    per step (lr · wd), the schedule, and the length: ``steps`` optimiser steps, or when 0,
    ``epochs`` passes over the images.
    """
    parameters = [p for name, p in visual.named_parameters() if name != "proj"]
    visual.proj.requires_grad_(False)
    batch = int(recipe["batch"])
    steps = int(recipe["steps"]) or int(recipe["epochs"]) * math.ceil(len(images) / batch)
    lr = float(recipe["lr"])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=float(recipe["wd_per_step"]) / lr)
    warmup = max(1, int(float(recipe["warmup"]) * steps))
    if recipe["schedule"] == "constant":
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    elif recipe["schedule"] == "onecycle":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=steps, pct_start=float(recipe["warmup"])
        )
    else:

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    train_on_head(visual, head, logit_scale, images, labels, optimizer, schedule, steps, batch, seed)


def train_on_head(
    visual, head, logit_scale: float, images, labels, optimizer, schedule, steps: int, batch: int, seed: int
) -> None:
    """``steps`` optimiser steps of cross-entropy on the frozen head, over seeded shuffled passes of the images.

    A pass ends early only at the last step, so whole passes give the same batches as a loop over epochs.
    """
    generator = torch.Generator().manual_seed(seed)
    targets = torch.from_numpy(labels)
    visual.train()
    step = 0
    while step < steps:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), batch):
            if step == steps:
                break
            step += 1
            index = order[start : start + batch]
            features = F.normalize(visual(normalise(images[index])), dim=-1)
            loss = F.cross_entropy(logit_scale * features @ head.T, targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    visual.eval()


_FINETUNE_JOB: dict = {}  # what forked fine-tuning workers read: set by finetune_tasks, inherited by fork


def _finetune_worker_start() -> None:
    torch.set_num_threads(1)


def _finetune_task(index: int) -> tuple[int, float, dict[str, torch.Tensor]]:
    """Fine-tune task ``index`` of ``_FINETUNE_JOB``: its test accuracy and encoder (without the projection)."""
    import copy

    job = _FINETUNE_JOB
    name = TASKS[index].name
    visual = copy.deepcopy(job["visual"])
    torch.manual_seed(job["seed"] * 1000 + index)
    images, labels = job["tune"][name]
    finetune(visual, job["heads"][name], job["logit_scale"], images, labels, job["recipe"], job["seed"] + index)
    tuned = accuracy(visual, job["heads"][name], *job["test"][name])
    return index, tuned, {k: v.detach().clone() for k, v in visual.state_dict().items() if k != "proj"}


def finetune_tasks(
    visual,
    heads: Mapping[str, torch.Tensor],
    logit_scale: float,
    tune: Mapping[str, tuple[torch.Tensor, np.ndarray]],
    test: Mapping[str, tuple[torch.Tensor, np.ndarray]],
    recipe: Mapping[str, object],
    seed: int,
    workers: int,
):
    """Fine-tune one copy of ``visual`` per task in ``tune``, ``workers`` at a time, each on one thread.

    Yields ``(index, test accuracy, state)`` as each finishes. Why one thread each: a fine-tune
    of the mini tower (batches of 32 images of 17 tokens) keeps two threads only partly busy,
    so on two cores two one-thread fine-tunes side by side do 1.55 times the work of one
    two-thread fine-tune after another (``benchmarks/build_finetune.py``). And a fine-tune that
    always runs on one thread gives the same weights whatever the number of workers or cores,
    so the build stays deterministic for its seed on any machine.
    """
    indices = [i for i, spec in enumerate(TASKS) if spec.name in tune]
    _FINETUNE_JOB.update(
        visual=visual, heads=heads, logit_scale=logit_scale, tune=tune, test=test, recipe=recipe, seed=seed
    )
    try:
        if workers <= 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for index in indices:
                    yield _finetune_task(index)
            finally:
                torch.set_num_threads(threads)
            return
        # fork: the workers inherit the job instead of unpickling 30 MB of images each; each
        # sets one thread before any work, so the parent's OpenMP pool is never used after fork
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(indices)), initializer=_finetune_worker_start) as pool:
            yield from pool.imap_unordered(_finetune_task, indices)
    finally:
        _FINETUNE_JOB.clear()


def storage_rounding(state: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor]) -> float:
    """‖round(θ_t) − θ_t‖ / ‖θ_t − θ0‖: how much storing θ_t in CHECKPOINT_DTYPE perturbs its task vector."""
    error = sum(float(((v.to(CHECKPOINT_DTYPE).float() - v) ** 2).sum()) for v in state.values())
    task = sum(float(((v - pretrained[k]) ** 2).sum()) for k, v in state.items())
    return math.sqrt(error / task)


def is_text_tower(name: str) -> bool:
    """Parameters that only serve the text side (every one but the image tower and the logit scale)."""
    return not name.startswith("visual.") and name != "logit_scale"


@torch.no_grad()
def round_text_tower(model, dtype: torch.dtype = TEXT_TOWER_DTYPE) -> dict[str, torch.Tensor]:
    """Round the text tower to ``dtype`` in place and return the state dict to store.

    Rounding in the model itself means the zero-shot heads computed afterwards are the heads
    a loader of the stored file computes, bit for bit.
    """
    stored = {}
    for name, value in model.state_dict().items():
        if is_text_tower(name) and value.is_floating_point():
            value.copy_(value.to(dtype).float())
            stored[name] = value.to(dtype).contiguous()
        else:
            stored[name] = value.contiguous()
    return stored


# ------------------------------------------------------------------ build

PRETRAINING_RECORD = "pretraining.json"  # beside a base the lab pretrained: its recipe and time
# What a report written before a setting was recorded implies for it.
UNRECORDED_PRETRAINING = {
    "vision_width": 96,
    "vision_layers": 4,
    "pretrain_images_per_task": 3000,
    "task_style": 0.3,
    "text_tower_dtype": "float32",
    "other_concepts": 0,
    "other_images_per_concept": 0,
}


def pretraining_recipe(
    seed: int,
    epochs: int,
    noise: float,
    width: int,
    layers: int,
    images: int,
    task_style: float,
    other_concepts: int = OTHER_CONCEPTS,
    other_images: int = OTHER_IMAGES_PER_CONCEPT,
) -> dict:
    """Everything that decides a pretrained base's weights, under the build report's names."""
    return {
        "seed": seed,
        "pretrain_epochs": epochs,
        "caption_noise": noise,
        "vision_width": width,
        "vision_layers": layers,
        "pretrain_images_per_task": images,
        "task_style": task_style,
        "other_concepts": other_concepts,
        "other_images_per_concept": other_images if other_concepts else 0,
    }


def other_concepts_corpus(
    pool, count: int, per_concept: int, seed: int, noise: float
) -> list[tuple[torch.Tensor, list[str]]]:
    """The pretraining corpus's images of concepts no task asks about, drawn by ``pool``'s workers
    (the result does not depend on how many: each concept has its own generator)."""
    if not count:
        return []
    from scripts.minibench.concepts import draw_corpus

    shares = max(1, min(count, os.cpu_count() or 1))
    drawn = pool.starmap(draw_corpus, [(count, per_concept, seed, noise, (k, shares)) for k in range(shares)])
    log(f"drew {count} other concepts, {per_concept} images each")
    return [(as_tensor(images), captions) for images, captions in drawn if images]


def reused_base(out: Path, reuse_base: bool | Path, wanted: Mapping, text_dtype: torch.dtype) -> tuple[Path, float]:
    """The folder of the base to reuse and the seconds its pretraining took, once its recorded
    recipe is the one asked for; otherwise stop, naming what differs, since a base from another
    recipe would silently ship under this recipe's name."""
    if reuse_base is True:
        source, report = out / "base", json.loads((out / "build_report.json").read_text())
        recorded, seconds = report.get("recipe", {}), report["seconds"]["pretrain"]
    else:
        source = Path(reuse_base)
        record = json.loads((source / PRETRAINING_RECORD).read_text())
        recorded, seconds = record["recipe"], record["seconds"]
    recorded = {**UNRECORDED_PRETRAINING, **recorded}
    differing = [
        f"{key} {recorded.get(key)} (asked {value})" for key, value in wanted.items() if recorded.get(key) != value
    ]
    stored = recorded["text_tower_dtype"]
    if stored != "float32" and stored != str(text_dtype).removeprefix("torch."):
        differing.append(f"text tower stored in {stored}, which cannot be widened back")
    if differing:
        raise SystemExit(f"--reuse-base: the base in {source} was pretrained differently: " + "; ".join(differing))
    return source, seconds


def build(
    out: Path,
    seed: int,
    pretrain_epochs: int,
    recipe: Mapping[str, object],
    noise: float,
    reuse_base: bool | Path = False,
    width: int = VISION_WIDTH,
    layers: int = VISION_LAYERS,
    pretrain_size: int = PRETRAIN_PER_TASK,
    text_dtype: torch.dtype = TEXT_TOWER_DTYPE,
    workers: int = 1,
    other_concepts: int = OTHER_CONCEPTS,
    other_images: int = OTHER_IMAGES_PER_CONCEPT,
) -> dict:
    """Draw the datasets, pretrain the tiny CLIP, fine-tune one image encoder per task (``workers`` at a time).

    ``reuse_base`` loads the base from a previous build with the same seed and recipe instead
    of pretraining again (pretraining is deterministic for the seed, so the result is the
    same); the report then carries the earlier build's pretraining time. ``True`` means the
    previous build in ``out``; a folder means a base the lab pretrained (``pretraining.json``
    beside its weights records its recipe), so that a base measured in the lab ships without
    another 40 minutes of pretraining.
    """
    torch.manual_seed(seed)
    started = time.time()
    wanted = pretraining_recipe(
        seed,
        pretrain_epochs,
        noise,
        width,
        layers,
        pretrain_size,
        TASK_STYLE_IN_PRETRAINING,
        other_concepts,
        other_images,
    )
    previous = reused_base(out, reuse_base, wanted, text_dtype) if reuse_base else None
    with multiprocessing.get_context("fork").Pool(min(len(TASKS), os.cpu_count() or 1)) as pool:
        drawn = pool.starmap(
            draw_task, [(index, seed, noise, TASK_STYLE_IN_PRETRAINING, pretrain_size) for index in range(len(TASKS))]
        )
        others = [] if previous else other_concepts_corpus(pool, other_concepts, other_images, seed, noise)
    splits: dict[str, dict[str, tuple]] = {}
    corpus = []
    for spec, (test, train, tune, web_images, captions) in zip(TASKS, drawn, strict=True):
        corpus.append((as_tensor(web_images), captions))
        for split, (images, labels) in (("test", test), ("train", train)):
            write_parquet(
                out / "datasets" / spec.name / "data" / f"{split}-00000-of-00001.parquet",
                images,
                labels,
                spec.name,
                split,
            )
        splits[spec.name] = {"test": (as_tensor(test[0]), test[1]), "tune": (as_tensor(tune[0]), tune[1])}
    corpus += others
    log(f"drew {len(TASKS)} tasks")
    drawn_at = time.time()

    from safetensors.torch import load_file, save_file

    base = out / "base"
    config = model_config(width, layers)
    model, tokenizer = create_model(base, config)
    if previous is not None:
        reused_from, pretrain_seconds = previous
        model.load_state_dict(load_file(str(reused_from / "open_clip_model.safetensors")))
        model.eval()
        log(f"reused the pretrained base in {reused_from}")
    else:
        pretrain(model, tokenizer, corpus, pretrain_epochs, seed)
        pretrain_seconds = time.time() - drawn_at
    save_file(round_text_tower(model, text_dtype), str(base / "open_clip_model.safetensors"))
    finetune_started = time.time()
    arch = VisionArch.from_shapes(
        {k: tuple(v.shape) for k, v in model.visual.state_dict().items()},
        **VisionArch.hints_from_open_clip_config(config),
    )
    logit_scale = float(model.logit_scale.exp())
    pretrained_visual = {k: v.detach().clone() for k, v in model.visual.state_dict().items() if k != "proj"}
    report = {
        "zero_shot": {},
        "finetuned": {},
        "storage_rounding": {},
        "seconds": {},
        "recipe": {
            **wanted,  # what decides the base, under the names --reuse-base checks
            "finetune": dict(recipe),
            "finetune_images": FINETUNE_SIZE,
            "train_per_class": TRAIN_PER_CLASS,
            "native_resolution": {spec.name: spec.native for spec in TASKS},
            "checkpoint_dtype": str(CHECKPOINT_DTYPE).removeprefix("torch."),
            "text_tower_dtype": str(text_dtype).removeprefix("torch."),
        },
    }
    heads = {spec.name: zeroshot_head(model, tokenizer, spec) for spec in TASKS}
    for spec in TASKS:
        report["zero_shot"][spec.name] = accuracy(model.visual, heads[spec.name], *splits[spec.name]["test"])
    tuned = finetune_tasks(
        model.visual,
        heads,
        logit_scale,
        {name: split["tune"] for name, split in splits.items()},
        {name: split["test"] for name, split in splits.items()},
        recipe,
        seed,
        workers,
    )
    for index, test_accuracy, state in tuned:
        spec = TASKS[index]
        report["finetuned"][spec.name] = test_accuracy
        report["storage_rounding"][spec.name] = storage_rounding(state, pretrained_visual)
        save_encoder(
            state,
            out / "checkpoints" / spec.name,
            "hf",
            arch,
            include_projection=False,
            dtype=CHECKPOINT_DTYPE,
            metadata={"merging.task": spec.name, "merging.recipe": "mini benchmark fine-tuning"},
        )
        log(
            f"{spec.name}: zero-shot {report['zero_shot'][spec.name]:.3f}, "
            f"fine-tuned {report['finetuned'][spec.name]:.3f}"
        )
    for key in ("finetuned", "storage_rounding"):  # in task order, as the workers' finishing order is not
        report[key] = {spec.name: report[key][spec.name] for spec in TASKS}
    write_registry(out)
    report["seconds"] = {
        "draw": drawn_at - started,
        "pretrain": pretrain_seconds,
        "finetune": time.time() - finetune_started,
        "pretrain_reused": previous is not None,
    }
    report["seconds"]["total"] = report["seconds"]["draw"] + pretrain_seconds + report["seconds"]["finetune"]
    return report


def write_registry(out: Path) -> None:
    try:  # inside assets/ the registry uses paths relative to it, so the repository can move
        relative = out.resolve().relative_to((ROOT / "assets").resolve())
    except ValueError:
        relative = out.resolve()
    tasks = {}
    for spec in TASKS:
        tasks[spec.name] = {
            "mirrors": spec.mirrors,
            "classnames": list(spec.classnames),
            "templates": list(spec.templates),
            "dataset": {
                "local": f"{relative}/datasets/{spec.name}",
                "split": "test",
                "train_split": "train",
                "image_column": "image",
                "label_column": "label",
            },
            "checkpoint": f"{relative}/checkpoints/{spec.name}",
        }
    registry = {
        "_about": "The embedded mini benchmark (backbone 'mini'), built by scripts/build_mini_benchmark.py.",
        "backbone": f"{relative}/base",
        "sets": {"mini-8": list(MINI_8), "mini-12": [spec.name for spec in TASKS]},
        "tasks": tasks,
    }
    (out / "tasks.json").write_text(json.dumps(registry, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "mini")
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    parser.add_argument(
        "--recipe",
        default="",
        help="fine-tuning recipe, key=value,... over " + ", ".join(f"{k}={v}" for k, v in FINETUNE_RECIPE.items()),
    )
    parser.add_argument("--caption-noise", type=float, default=0.3)
    parser.add_argument(
        "--pretrain-images",
        type=int,
        default=PRETRAIN_PER_TASK,
        help="captioned pretraining images drawn per task",
    )
    parser.add_argument(
        "--other-concepts",
        type=int,
        default=OTHER_CONCEPTS,
        help="concepts no task asks about, added to the pretraining corpus (scripts/minibench/concepts.py)",
    )
    parser.add_argument(
        "--other-images", type=int, default=OTHER_IMAGES_PER_CONCEPT, help="captioned images drawn per other concept"
    )
    parser.add_argument(
        "--text-tower-dtype",
        choices=sorted(TEXT_TOWER_DTYPES),
        default=str(TEXT_TOWER_DTYPE).removeprefix("torch."),
        help="how the base's text tower is stored (the zero-shot heads come from the stored weights)",
    )
    parser.add_argument("--width", type=int, default=VISION_WIDTH, help="image-tower width (a multiple of 16)")
    parser.add_argument("--layers", type=int, default=VISION_LAYERS, help="image-tower blocks")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--finetune-workers",
        type=int,
        default=min(len(TASKS), os.cpu_count() or 1),
        help="fine-tunes run side by side, one thread each (the weights do not depend on it; default: the cores)",
    )
    parser.add_argument("--report-only", action="store_true", help="only re-measure and rewrite README.md")
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="build only (the report can measure only a benchmark in assets/mini)",
    )
    parser.add_argument(
        "--reuse-base",
        nargs="?",
        const=True,
        default=False,
        type=Path,
        metavar="DIR",
        help="skip pretraining: load the base of the previous build, or the base the lab pretrained in DIR "
        "(same seed and pretraining recipe)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from scripts.minibench.report import require_shipped_location, write_report

    if not args.no_report:
        require_shipped_location(args.out)  # before the build's hour, not after it
    if args.report_only:
        report = json.loads((args.out / "build_report.json").read_text())
    else:
        report = build(
            args.out,
            args.seed,
            args.pretrain_epochs,
            parse_recipe(args.recipe),
            args.caption_noise,
            args.reuse_base,
            args.width,
            args.layers,
            args.pretrain_images,
            TEXT_TOWER_DTYPES[args.text_tower_dtype],
            args.finetune_workers,
            args.other_concepts,
            args.other_images,
        )
        (args.out / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.no_report:
        return
    measured = write_report(args.out, report)
    log(f"mini-8: {json.dumps(measured['acc'])}; checks: {json.dumps(measured['checks'])}")
    zs, ft = report["zero_shot"], report["finetuned"]
    log(
        f"zero-shot mean {np.mean(list(zs.values())):.3f}, fine-tuned mean {np.mean(list(ft.values())):.3f}, "
        f"{report['seconds']['total'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
