"""Evaluation images: parquet files read with pyarrow, decoded and preprocessed once, cached.

Datasets are in the layout the Hugging Face Hub uses: parquet files named
``<split>-XXXXX-of-XXXXX.parquet`` (under ``data/`` or a config folder) with an image column
(``{"bytes": ..., "path": ...}`` structs, or raw bytes) and an integer label column.

The costly part, decoding and resizing, happens once per (dataset, split, sample cap,
preprocessing): the result is kept as uint8 tensors, in memory and on disk, so later
evaluations only normalise and run the network. uint8 after resizing and cropping is
exactly what CLIP's ``ToTensor`` sees, so no precision is lost (and it is 4× smaller
than float32).

Decoding runs on as many threads as the run's share of the cores (PIL releases the GIL
while it decodes and resizes), each image written straight into one preallocated batch:
stacking thousands of small tensors afterwards went through torch's parallel copy, whose
threads spin against the decoding ones and made it the slowest part of a cold evaluation.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from merging.errors import MergingError
from merging.evaluation.backbones import Preprocess
from merging.evaluation.image_set import ImageSet
from merging.evaluation.tasks import Task
from merging.io.disk_cache import DiskCache, cache_root

SAMPLE_SEED = 0


def parquet_files(task: Task, split: str) -> list[Path]:
    """The parquet files of a dataset split, local or on the Hub (only that split is fetched).

    Raises naming the task (and the dataset id) when there are none.
    """
    if not task.dataset.is_local:
        from merging.io.hub import HubError, dataset_folder

        try:
            root = dataset_folder(task.dataset.location, split, task.dataset.config)
        except HubError as exc:
            raise MergingError(f"dataset of task {task.name}: {exc}") from None
    else:
        root = task.dataset.path
    if not root.is_dir():
        raise MergingError(f"dataset of task {task.name} not found: {root} is not a folder")
    patterns = [f"**/{split}-*.parquet", f"**/{split}.parquet", f"**/{split}/*.parquet"]
    if task.dataset.config:
        patterns = [f"{task.dataset.config}/{p}" for p in patterns] + patterns
    for pattern in patterns:
        files = sorted(root.glob(pattern))
        if files:
            return files
    raise MergingError(f"dataset of task {task.name}: no parquet files for split {split!r} in {root}")


def sample_indices(total: int, limit: int | None) -> np.ndarray:
    """A deterministic subset of ``limit`` rows (all rows if fewer), in their original order."""
    if limit is None or total <= limit:
        return np.arange(total)
    return np.sort(np.random.default_rng(SAMPLE_SEED).permutation(total)[:limit])


def preprocess_image(image: Image.Image, spec: Preprocess) -> Tensor:
    """Resize and centre-crop as CLIP does; uint8 3 × H × W (normalisation comes later).

    The same tensor, byte for byte, as torchvision's ``pil_to_tensor`` after its ``Resize`` and
    ``CenterCrop`` (see :func:`_preprocessed_pil`), without importing torchvision.
    """
    image = _preprocessed_pil(image, spec)
    width, height = image.size
    return torch.from_numpy(np.array(image)).view(height, width, 3).permute(2, 0, 1)


# PIL's resampling filter for each interpolation a Preprocess can name: torchvision's mapping for
# PIL images (its ``pil_modes_mapping``; "nearest-exact" is PIL's nearest, which already is exact).
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def _preprocessed_pil(image: Image.Image, spec: Preprocess) -> Image.Image:
    """Short side resized to ``image_size``, centre crop, RGB: what torchvision 0.29's ``Resize`` and
    ``CenterCrop`` do to a PIL image, in plain PIL (importing torchvision costs ~1 s; tested equal)."""
    resample = _PIL_RESAMPLE.get(spec.interpolation)
    if resample is None:
        known = ", ".join(repr(name) for name in _PIL_RESAMPLE)
        raise MergingError(f"unsupported interpolation {spec.interpolation!r} (one of {known})")
    if spec.resize_mode != "shortest":
        raise MergingError(f"unsupported resize mode {spec.resize_mode!r} (only 'shortest')")
    image = _resize_shortest(image, spec.image_size, resample)
    image = _center_crop(image, spec.image_size)
    return image.convert("RGB")


def _resize_shortest(image: Image.Image, size: int, resample: int) -> Image.Image:
    """The short side to ``size``, the long one to ``int(size * long / short)``; unchanged if already so."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), resample)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size`` × ``size`` square, offsets rounded as torchvision rounds them.

    Where the image is smaller than the crop, torchvision pads it with zeros, split as
    ``(missing // 2, (missing + 1) // 2)``, and crops nothing on that side; PIL's crop fills
    outside the image with zeros too, so a crop box starting at ``-(missing // 2)`` is the same.
    """
    width, height = image.size
    left = -((size - width) // 2) if size > width else round((width - size) / 2.0)
    top = -((size - height) // 2) if size > height else round((height - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


class UndecodableImage(MergingError):
    """An image PIL cannot read; ``position`` is its index in the list given to :func:`decode_images`."""

    def __init__(self, position: int, cause: Exception):
        super().__init__(f"image {position} cannot be decoded: {type(cause).__name__}: {cause}")
        self.position = position
        self.cause = cause


def decode_images(encoded: list[bytes], spec: Preprocess, workers: int | None = None) -> Tensor:
    """Encoded images → preprocessed uint8 N × 3 × H × W, on ``workers`` threads (default: torch's count).

    Each worker writes its images into one preallocated N × H × W × 3 batch (a plain copy
    of PIL's pixel layout), which is turned channel-first once at the end. The result is
    the same for any number of workers.
    """
    size = spec.image_size
    batch = torch.empty((len(encoded), size, size, 3), dtype=torch.uint8)

    def decode(position: int) -> None:
        try:
            image = _preprocessed_pil(Image.open(io.BytesIO(encoded[position])), spec)
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for damaged or unknown data
            raise UndecodableImage(position, exc) from None
        batch[position].numpy()[...] = np.asarray(image)  # a copy into the batch's memory

    workers = max(1, min(workers or torch.get_num_threads(), len(encoded)))
    if workers == 1:
        for position in range(len(encoded)):
            decode(position)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(decode, range(len(encoded))):
                pass  # map re-raises the first failure here
    return batch.permute(0, 3, 1, 2).contiguous()


def normalise(images: Tensor, spec: Preprocess, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 images → the normalised float tensor CLIP's image tower expects."""
    mean = torch.tensor(spec.mean, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    return (images.to(dtype) / 255.0 - mean) / std


JPEG_MAGIC = b"\xff\xd8"
_DEVICE_DECODE_BATCH = 256


def decode_images_on(encoded: list[bytes], spec: Preprocess, device: torch.device | str) -> Tensor:
    """Encoded images → preprocessed uint8 N × 3 × H × W (on the CPU), decoded on ``device`` where they are JPEGs.

    JPEGs go through ``torchvision.io.decode_jpeg`` in batches (nvJPEG on CUDA), then an
    antialiased bicubic resize of the short side and a centre crop as tensor operations on
    the same device; other formats, and a batch the device decoder refuses, through PIL
    (:func:`decode_images`). On the CPU this equals the PIL path to within one level of 255
    per pixel (the resize's rounding; tested); nvJPEG may differ from libjpeg by a few levels.
    It pays on a GPU, where a CPU thread decodes a few hundred images a second and the GPU
    thousands; on a CPU, PIL is as exact and faster, so the evaluator uses this only on CUDA.
    """
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tensor_ops

    device = torch.device(device)
    size = spec.image_size
    if spec.resize_mode != "shortest":
        raise MergingError(f"unsupported resize mode {spec.resize_mode!r} (only 'shortest')")
    interpolation = InterpolationMode(spec.interpolation)
    batch = torch.empty((len(encoded), 3, size, size), dtype=torch.uint8)
    jpegs = [i for i, data in enumerate(encoded) if data[:2] == JPEG_MAGIC]
    by_pil = sorted(set(range(len(encoded))) - set(jpegs))
    for start in range(0, len(jpegs), _DEVICE_DECODE_BATCH):
        chunk = jpegs[start : start + _DEVICE_DECODE_BATCH]
        data = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in chunk]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # a file the device decoder cannot read: PIL reads it, or names it
            by_pil += chunk
            continue
        crops = [
            tensor_ops.center_crop(
                tensor_ops.resize(image, [size], interpolation=interpolation, antialias=True), [size, size]
            )
            for image in images
        ]
        batch[chunk] = torch.stack(crops).cpu()  # one copy back (and one synchronisation) per batch
    if by_pil:
        try:
            batch[sorted(by_pil)] = decode_images([encoded[i] for i in sorted(by_pil)], spec)
        except UndecodableImage as exc:
            raise UndecodableImage(sorted(by_pil)[exc.position], exc.cause) from None
    return batch


class ImageCache:
    """Decoded, preprocessed image sets, in memory and on disk; counts what it had to decode.

    The cache key stamps the dataset's files, which for a Hub dataset means resolving its
    snapshot. That snapshot cannot change within a process, so a Hub dataset's key is
    remembered per request and an in-memory hit asks the Hub nothing; a local dataset is
    re-stamped at every load (a few ``stat`` calls), so edited files are noticed.

    Loads are thread-safe, and one split is decoded once however many threads ask for it at
    the same time: a run decodes the next task's images in the background while the current
    one is evaluated (:mod:`merging.experiment.prefetch`), and the evaluation that then
    needs them waits for that decode instead of starting its own.
    """

    def __init__(self, directory: Path | None = None, device: torch.device | str = "cpu"):
        self.disk = DiskCache(directory or cache_root(), "images")
        self.directory = self.disk.directory
        # On CUDA, JPEGs are decoded on the GPU and the cached batches are pinned (page-locked)
        # so that copies to the GPU run asynchronously, overlapping the network's compute.
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self._memory: dict[str, ImageSet] = {}
        self._keys: dict[tuple, str] = {}  # Hub datasets: request → key, so memory hits need no Hub call
        self._locks: dict[str, threading.Lock] = {}  # one per key: a split is decoded by one thread only
        self._guard = threading.Lock()  # protects the dictionaries and the counter
        self.decoded = 0  # images decoded by this cache (tests check that a second run decodes none)

    def load(self, task: Task, split: str, spec: Preprocess, limit: int | None) -> ImageSet:
        """The preprocessed sample of a split: from memory, else from disk, else decoded (and stored)."""
        request = (task.name, task.dataset, split, spec.key(), limit)
        key = self._keys.get(request) or self._key(task, split, spec, limit)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._memory:
                return self._memory[key]
            name = f"{key}.safetensors"
            result = self.disk.read(name, _read_image_set)  # None when missing or damaged: rebuilt, never trusted
            if result is None:
                result = self._decode(task, split, spec, limit)
                tensors = {"images": result.images.contiguous(), "labels": result.labels}
                self.disk.write(name, lambda path: save_file(tensors, str(path)))
            if self.on_gpu:
                result = ImageSet(result.images.pin_memory(), result.labels)
            with self._guard:
                self._memory[key] = result
                if not task.dataset.is_local:
                    self._keys[request] = key
            return result

    def _key(self, task: Task, split: str, spec: Preprocess, limit: int | None) -> str:
        files = parquet_files(task, split)
        stamp = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        text = f"{task.dataset.location}|{split}|{limit}|{spec.key()}|{task.dataset.image_column}|{stamp}"
        if self.on_gpu:  # decoded on the GPU: within a few levels of the CPU's pixels, not equal to them
            text += "|device-decoder"
        return f"{task.name}-{split}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"

    def _decode(self, task: Task, split: str, spec: Preprocess, limit: int | None) -> ImageSet:
        columns = [task.dataset.image_column, task.dataset.label_column]
        tables = []
        for file in parquet_files(task, split):
            # ParquetFile.read, not read_table: the latter imports pyarrow.dataset and pandas (~0.2 s
            # of a cold start) for what is one file's columns; it returns absent columns silently.
            culprit = f"dataset of task {task.name}: {file.name}"
            try:
                parquet = pq.ParquetFile(file)
            except (OSError, ValueError) as exc:
                raise MergingError(f"{culprit} is not a readable parquet file ({exc})") from None
            names = parquet.schema_arrow.names
            if not set(columns) <= set(names):
                raise MergingError(f"{culprit} lacks column(s) {columns}: it has {names}")
            try:
                tables.append(parquet.read(columns=columns))
            except (OSError, ValueError) as exc:
                raise MergingError(f"{culprit} could not be read ({exc})") from None
        images_column = [row for table in tables for row in table.column(columns[0]).to_pylist()]
        labels = np.concatenate([np.asarray(table.column(columns[1]).to_pylist()).astype(np.int64) for table in tables])
        chosen = sample_indices(len(labels), limit)
        if not len(chosen):
            raise MergingError(f"dataset of task {task.name}: split {split!r} is empty")
        cells = [images_column[index] for index in chosen]
        encoded = [cell["bytes"] if isinstance(cell, dict) else cell for cell in cells]
        try:
            images = decode_images_on(encoded, spec, self.device) if self.on_gpu else decode_images(encoded, spec)
        except UndecodableImage as exc:
            raise MergingError(
                f"dataset of task {task.name}: the image in row {int(chosen[exc.position])} of split {split!r} "
                f"cannot be decoded ({type(exc.cause).__name__}: {exc.cause})"
            ) from None
        self.decoded += len(encoded)
        return ImageSet(images, torch.from_numpy(labels[chosen]))


def _read_image_set(path: Path) -> ImageSet:
    stored = load_file(str(path))
    return ImageSet(stored["images"], stored["labels"])
