"""CPU preprocessing in plain PIL gives torchvision's bytes (and does not import torchvision).

``merging.evaluation.datasets`` resizes and centre-crops PIL images itself, as torchvision
0.29's ``Resize``, ``CenterCrop`` and ``pil_to_tensor`` do; these tests hold it to their
output byte for byte, importing torchvision only here, as the reference.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from merging.errors import MergingError
from merging.evaluation.backbones import Preprocess
from merging.evaluation.datasets import _center_crop, _preprocessed_pil, decode_images, preprocess_image

PROJECT = Path(__file__).resolve().parents[1]
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "nearest-exact", "box", "hamming", "lanczos")
MODES = ("RGB", "L", "P", "RGBA", "CMYK", "I;16", "LA", "1")
# (width, height): smaller than, equal to and larger than 32 and 224; square, portrait, landscape; odd sizes
SHAPES = (
    (7, 5),
    (5, 9),
    (1, 6),
    (32, 32),
    (31, 33),
    (33, 32),
    (45, 32),
    (224, 224),
    (225, 224),
    (224, 301),
    (301, 227),
)


def _image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.frombytes("I;16", (width, height), rng.integers(0, 512, (height, width), np.uint16).tobytes())
    if mode == "1":
        return _image("L", width, height, seed).convert("1")  # dithered: both values, in patterns
    if mode == "P":
        image = Image.frombytes("P", (width, height), rng.integers(0, 200, (height, width), np.uint8).tobytes())
        image.putpalette(rng.integers(0, 256, 200 * 3, np.uint8).tobytes())
        return image
    bands = Image.getmodebands(mode)
    return Image.frombytes(mode, (width, height), rng.integers(0, 256, (height, width, bands), np.uint8).tobytes())


def _torchvision_pil(image: Image.Image, spec: Preprocess) -> Image.Image:
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    image = Resize(spec.image_size, interpolation=InterpolationMode(spec.interpolation))(image)
    return CenterCrop(spec.image_size)(image).convert("RGB")


def _torchvision_tensor(image: Image.Image, spec: Preprocess) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(_torchvision_pil(image, spec))


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype == torch.uint8
    assert ours.shape == theirs.shape and ours.stride() == theirs.stride()
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("size", (32, 224))
def test_preprocessing_gives_torchvisions_bytes(size, interpolation):
    spec = Preprocess(size, interpolation=interpolation)
    for seed, (mode, (width, height)) in enumerate((m, s) for m in MODES for s in SHAPES):
        image = _image(mode, width, height, seed)
        theirs = _torchvision_pil(image, spec)
        ours = _preprocessed_pil(image, spec)
        assert (ours.mode, ours.size) == (theirs.mode, theirs.size) == ("RGB", (size, size))
        assert ours.tobytes() == theirs.tobytes(), (mode, width, height)
        _assert_same(preprocess_image(image, spec), _torchvision_tensor(image, spec))


@pytest.mark.parametrize("mode", MODES)
def test_centre_crop_pads_and_rounds_as_torchvision_does(mode):
    from torchvision.transforms.functional import center_crop

    for seed, (width, height) in enumerate(((4, 4), (3, 8), (8, 3), (5, 6), (6, 5), (9, 9), (2, 2), (10, 7), (7, 10))):
        image = _image(mode, width, height, seed)
        for size in (1, 4, 5, 6, 7, 8):
            theirs = center_crop(image, [size])
            ours = _center_crop(image, size)
            assert (ours.mode, ours.size) == (theirs.mode, theirs.size)
            assert ours.tobytes() == theirs.tobytes(), (width, height, size)
            assert ours.convert("RGB").tobytes() == theirs.convert("RGB").tobytes()


def _encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def _encoded_images() -> list[bytes]:
    return [
        _encoded(_image("RGB", 40, 30, 1), "JPEG"),
        _encoded(_image("L", 19, 37, 2), "JPEG"),
        _encoded(_image("CMYK", 33, 33, 3), "JPEG"),
        _encoded(_image("RGB", 250, 231, 4), "PNG"),
        _encoded(_image("P", 32, 32, 5), "PNG"),
        _encoded(_image("RGBA", 21, 50, 6), "PNG"),
        _encoded(_image("I;16", 35, 29, 7), "PNG"),
        _encoded(_image("LA", 224, 224, 8), "PNG"),
    ]


@pytest.mark.parametrize("interpolation", ("bicubic", "bilinear", "nearest"))
@pytest.mark.parametrize("size", (32, 224))
def test_decoding_gives_torchvisions_batch(size, interpolation):
    encoded = _encoded_images()
    spec = Preprocess(size, interpolation=interpolation)
    expected = torch.stack([_torchvision_tensor(Image.open(io.BytesIO(data)), spec) for data in encoded])
    for workers in (1, 3):
        decoded = decode_images(encoded, spec, workers)
        assert decoded.dtype == torch.uint8 and decoded.is_contiguous()
        assert torch.equal(decoded, expected)


def test_an_unknown_interpolation_is_refused_by_name():
    spec = Preprocess(32, interpolation="cubic-spline")
    with pytest.raises(MergingError, match="cubic-spline"):
        preprocess_image(_image("RGB", 40, 30, 0), spec)
    with pytest.raises(MergingError, match="cubic-spline"):
        decode_images(_encoded_images()[:2], spec, 1)


def test_an_unknown_resize_mode_is_still_refused():
    with pytest.raises(MergingError, match="squash"):
        preprocess_image(_image("RGB", 40, 30, 0), Preprocess(32, resize_mode="squash"))


def test_decoding_on_the_cpu_does_not_import_torchvision():
    code = (
        "import io, json, sys\n"
        "from PIL import Image\n"
        "from merging.evaluation.backbones import Preprocess\n"
        "from merging.evaluation.datasets import decode_images, preprocess_image\n"
        "encoded = []\n"
        "for format in ('PNG', 'JPEG'):\n"
        "    buffer = io.BytesIO()\n"
        "    Image.new('RGB', (40, 30), (200, 10, 90)).save(buffer, format=format)\n"
        "    encoded.append(buffer.getvalue())\n"
        "batch = decode_images(encoded, Preprocess(image_size=16), workers=2)\n"
        "assert tuple(batch.shape) == (2, 3, 16, 16)\n"
        "assert tuple(preprocess_image(Image.new('L', (9, 20)), Preprocess(16)).shape) == (3, 16, 16)\n"
        "print(json.dumps([m for m in ('torchvision', 'torch._dynamo') if m in sys.modules]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SPACES_ZERO_GPU", "SPACE_ID")}
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
