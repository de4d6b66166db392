"""Accuracy of an image encoder on tasks, with the pretrained text tower's zero-shot heads.

An :class:`Evaluator` is bound to one backbone, device and sample cap. It keeps its own copy
of the image tower and loads each encoder to evaluate into it, so evaluating never touches
the backbone itself. Inference is batched without gradients, float32 on the CPU and
bfloat16 autocast on CUDA.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from merging.evaluation.backbones import Backbone
from merging.evaluation.datasets import ImageCache, ImageSet, cache_root, normalise
from merging.evaluation.tasks import Task
from merging.evaluation.zeroshot import HeadCache

DEFAULT_SAMPLES = 500
CUDA_BATCH = 1024
# On the CPU a batch of about this many tokens keeps a block's activations in cache: measured
# on 2 cores, the mini tower runs 500 images 1.15-1.6x faster (one thread) in batches of 120
# than in one batch of 500, and ViT-B/32 1.3x faster in batches of 32 than 128. A batch's
# matrix products may take another kernel or thread split, so features can move in the last
# bits (about 1e-7) with the batch size; no accuracy of the mini benchmark did
# (tests/test_eval_batches.py; every accuracy of a mini-12 run of five methods was unchanged).
CPU_TOKENS_PER_BATCH = 2048


CPU_BATCH_WITHOUT_TOKENS = 500  # images, for an image tower that has no patch tokens (not a ViT)


def default_batch_size(device: torch.device, tokens: int | None) -> int:
    """Images per evaluation batch: large on CUDA, about CPU_TOKENS_PER_BATCH tokens on the CPU
    (``tokens``: the tower's tokens per image; None for a tower without them)."""
    if device.type == "cuda":
        return CUDA_BATCH
    if tokens is None:
        return CPU_BATCH_WITHOUT_TOKENS
    return max(1, CPU_TOKENS_PER_BATCH // max(1, tokens))


class Evaluator:
    def __init__(
        self,
        backbone: Backbone,
        device: torch.device | str = "cpu",
        samples: int | None = DEFAULT_SAMPLES,
        cache_dir: Path | None = None,
        batch_size: int | None = None,
    ):
        self.backbone = backbone
        self.device = torch.device(device)
        self.samples = samples
        directory = cache_dir or cache_root()
        self.images = ImageCache(directory, self.device)
        self.heads = HeadCache(directory)
        self.visual = copy.deepcopy(backbone.model.visual).to(self.device).eval()
        embedding = getattr(self.visual, "positional_embedding", None)  # a ViT's tokens; other towers lack it
        tokens = None if embedding is None else int(embedding.shape[0])
        self.batch_size = batch_size or default_batch_size(self.device, tokens)
        for parameter in self.visual.parameters():
            parameter.requires_grad_(False)
        # what features() runs: the tower with the loaded encoder, or a method's own merged model
        self.model: torch.nn.Module = self.visual

    def test_set(self, task: Task) -> ImageSet:
        return self.task_images(task, task.dataset.split)

    def head(self, task: Task) -> Tensor:
        return self.heads.get(self.backbone, task).to(self.device)

    def load_encoder(self, state: Mapping[str, Tensor]) -> None:
        """Put an image encoder (canonical keys; missing ones keep the pretrained value) in place."""
        with torch.no_grad():
            own = self.visual.state_dict()
            for key, value in state.items():
                own[key].copy_(value)
        self.model = self.visual

    def use_model(self, model: torch.nn.Module) -> None:
        """Evaluate ``model`` (normalised images → image features) instead of the tower, until the next load."""
        self.model = model.eval()

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings of uint8 images, in batches, from the loaded encoder or model."""
        outputs = []
        autocast = self.device.type == "cuda"
        for batch in self._device_batches(images):
            batch = normalise(batch, self.backbone.preprocess)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                outputs.append(F.normalize(self.model(batch).float(), dim=-1))
        return torch.cat(outputs)

    def _device_batches(self, images: Tensor) -> Iterator[Tensor]:
        """The uint8 images in batches on the evaluator's device.

        On CUDA each next batch is copied on a side stream while the current one computes; the
        copy is asynchronous when the images are in pinned memory (the image cache pins them on
        a CUDA evaluator), and the compute stream waits for it only where it uses the batch.
        """
        starts = range(0, images.shape[0], self.batch_size)
        if self.device.type != "cuda":
            for start in starts:
                yield images[start : start + self.batch_size].to(self.device)
            return
        copies = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        def copy(start: int) -> Tensor:
            with torch.cuda.stream(copies):
                return images[start : start + self.batch_size].to(self.device, non_blocking=True)

        pending = copy(0)
        for start in starts:
            compute.wait_stream(copies)
            batch = pending
            batch.record_stream(compute)  # allocated on the copy stream, used on the compute stream
            if start + self.batch_size < images.shape[0]:
                pending = copy(start + self.batch_size)
            yield batch

    def accuracy(self, task: Task, head: Tensor | None = None) -> float:
        """Accuracy of the encoder currently loaded on ``task``'s test images (a fraction)."""
        data = self.test_set(task)
        logits = self.features(data.images) @ (self.head(task) if head is None else head.to(self.device)).T
        return float((logits.argmax(dim=-1).cpu() == data.labels).float().mean())

    def evaluate(
        self,
        state: Mapping[str, Tensor] | None,
        tasks: Iterable[Task],
        heads: Mapping[str, Tensor] | None = None,
        model: torch.nn.Module | None = None,
    ) -> dict[str, float]:
        """Accuracy per task of ``state`` (None: the pretrained encoder), or of ``model`` when given.

        ``heads`` overrides the zero-shot head of the tasks it names (OTMF's tuned heads);
        ``model`` is a method's merged model that is not a plain encoder (``StepResult.model``).
        """
        if model is not None:
            self.use_model(model)
        else:
            self.load_encoder(self.backbone.visual_state() if state is None else state)
        heads = heads or {}
        return {task.name: self.accuracy(task, heads.get(task.name)) for task in tasks}

    def task_images(self, task: Task, split: str) -> ImageSet:
        """A split's cached sample (the same cap as the test sets), for data-driven methods."""
        return self.images.load(task, split, self.backbone.preprocess, self.samples)

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 images → the encoder's normalised float input on the evaluator's device."""
        return normalise(images.to(self.device), self.backbone.preprocess)
