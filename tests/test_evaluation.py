"""Zero-shot heads, parquet datasets, the preprocessing cache and accuracy, on a tiny random CLIP."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from merging.errors import MergingError
from merging.evaluation.backbones import load_backbone
from merging.evaluation.datasets import (
    ImageCache,
    UndecodableImage,
    decode_images,
    decode_images_on,
    normalise,
    preprocess_image,
    sample_indices,
)
from merging.evaluation.evaluator import Evaluator
from merging.evaluation.tasks import parse_registry
from merging.evaluation.zeroshot import build_head

TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"interpolation": "bicubic", "resize_mode": "shortest"},
}


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """A random tiny CLIP in open_clip's Hub format, loaded as a local-dir backbone."""
    import open_clip
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("tiny-clip")
    (directory / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors")
    )
    return load_backbone(f"local-dir:{directory}")


def write_dataset(root, split, images, labels, image_column="image", label_column="label"):
    path = root / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    pq.write_table(pa.table({image_column: cells, label_column: labels}), path)


def registry_for(root, name="toy", **dataset):
    return parse_registry(
        {
            "sets": {"toy-set": [name]},
            "tasks": {
                name: {
                    "classnames": ["red", "green", "blue"],
                    "templates": ["a {} square.", "{}"],
                    "dataset": {"local": str(root), "split": "test", **dataset},
                }
            },
        }
    )


def colour_images(n, seed=0, size=24):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = []
    for label in labels:
        array = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        array[..., label] += 180
        images.append(Image.fromarray(array))
    return images, labels.tolist()


def test_head_is_normalised_mean_of_normalised_prompt_embeddings(tiny_backbone):
    head = build_head(tiny_backbone, ("cat", "dog"), ("a photo of a {}.", "a {}"))
    tokens = tiny_backbone.tokenizer(["a photo of a cat.", "a cat"])
    with torch.no_grad():
        expected = F.normalize(F.normalize(tiny_backbone.model.encode_text(tokens), dim=-1).mean(0), dim=0)
    torch.testing.assert_close(head[0], expected)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(2))


def test_preprocessing_matches_open_clip(tiny_backbone):
    import open_clip

    spec = tiny_backbone.preprocess
    transform = open_clip.image_transform(spec.image_size, is_train=False, mean=spec.mean, std=spec.std)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 41, 3), dtype=np.uint8))
    ours = normalise(preprocess_image(image, spec)[None], spec)[0]
    torch.testing.assert_close(ours, transform(image), atol=1e-6, rtol=0)


def test_parallel_decoding_equals_one_image_at_a_time(tiny_backbone):
    rng = np.random.default_rng(5)
    encoded = []
    for index in range(9):  # JPEG and PNG, landscape, portrait, greyscale: every branch of the resize
        shape = (20 + 3 * index, 31 - index) if index % 3 else (25, 25)
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L" if index == 4 else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if index % 2 else "PNG")
        encoded.append(buffer.getvalue())
    spec = tiny_backbone.preprocess
    expected = torch.stack([preprocess_image(Image.open(io.BytesIO(data)), spec) for data in encoded])
    for workers in (1, 2, 4):
        decoded = decode_images(encoded, spec, workers)
        assert decoded.is_contiguous() and torch.equal(decoded, expected)


def _encoded_mix(seed: int = 6) -> list[bytes]:
    """JPEGs (colour, greyscale, large, tiny) and PNGs of assorted shapes."""
    rng = np.random.default_rng(seed)
    encoded = []
    for index, (height, width) in enumerate([(375, 500), (32, 32), (28, 28), (600, 800), (20, 31), (96, 96), (40, 25)]):
        coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        image = image.convert("L") if index == 2 else image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if index in (4, 6) else "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def test_device_decoding_matches_pil_within_one_level(tiny_backbone):
    from merging.evaluation.backbones import Preprocess

    encoded = _encoded_mix()
    for spec in (tiny_backbone.preprocess, Preprocess(224)):
        expected = decode_images(encoded, spec, 1)
        decoded = decode_images_on(encoded, spec, "cpu")
        difference = (decoded.int() - expected.int()).abs()
        assert decoded.shape == expected.shape and decoded.dtype == torch.uint8
        assert int(difference.max()) <= 1 and float(difference.float().mean()) < 0.02
        assert torch.equal(decoded[[4, 6]], expected[[4, 6]])  # PNGs go through PIL itself


def test_device_decoding_names_a_broken_jpeg_by_its_position(tiny_backbone):
    encoded = _encoded_mix()
    encoded[3] = encoded[3][:2] + b"broken"  # a JPEG's magic number and nothing else
    with pytest.raises(UndecodableImage) as failure:
        decode_images_on(encoded, tiny_backbone.preprocess, "cpu")
    assert failure.value.position == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_and_pinned_batches_give_the_cpu_features(tmp_path, tiny_backbone):
    encoded = _encoded_mix()
    spec = tiny_backbone.preprocess
    on_gpu = decode_images_on(encoded, spec, "cuda")
    assert int((on_gpu.int() - decode_images(encoded, spec).int()).abs().max()) <= 8  # nvJPEG vs libjpeg
    images, _ = colour_images(40)
    cpu, gpu = (Evaluator(tiny_backbone, d, cache_dir=tmp_path / d, batch_size=16) for d in ("cpu", "cuda"))
    data = torch.stack([preprocess_image(image, spec) for image in images])
    torch.testing.assert_close(gpu.features(data.pin_memory()).cpu(), cpu.features(data), atol=2e-2, rtol=0)


def test_an_undecodable_image_is_named_by_task_and_row(tmp_path, tiny_backbone):
    images, labels = colour_images(6)
    write_dataset(tmp_path / "toy", "test", images, labels)
    path = tmp_path / "toy" / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(path).to_pydict()
    table["image"][4] = {"bytes": b"not an image", "path": None}
    pq.write_table(pa.table(table), path)
    task = registry_for(tmp_path / "toy").get("toy")
    with pytest.raises(MergingError, match=r"task toy: the image in row 4 of split 'test' cannot be decoded"):
        ImageCache(tmp_path / "cache").load(task, "test", tiny_backbone.preprocess, limit=None)


def test_sample_cap_is_deterministic_and_ordered():
    a, b = sample_indices(1000, 50), sample_indices(1000, 50)
    assert np.array_equal(a, b) and len(a) == 50 and np.all(np.diff(a) > 0)
    assert np.array_equal(sample_indices(10, 50), np.arange(10))


def test_images_are_decoded_once_then_cached_on_disk(tmp_path, tiny_backbone):
    images, labels = colour_images(40)
    write_dataset(tmp_path / "toy", "test", images, labels)
    task = registry_for(tmp_path / "toy").get("toy")
    first = ImageCache(tmp_path / "cache")
    data = first.load(task, "test", tiny_backbone.preprocess, limit=30)
    assert first.decoded == 30 and data.images.shape == (30, 3, 16, 16) and data.images.dtype == torch.uint8
    again = first.load(task, "test", tiny_backbone.preprocess, limit=30)
    assert again is data and first.decoded == 30
    second = ImageCache(tmp_path / "cache")  # a new process: reads the disk cache
    reread = second.load(task, "test", tiny_backbone.preprocess, limit=30)
    assert second.decoded == 0 and torch.equal(reread.images, data.images) and torch.equal(reread.labels, data.labels)


def test_accuracy_against_hand_computation(tmp_path, tiny_backbone):
    images, labels = colour_images(25, seed=3)
    write_dataset(tmp_path / "toy", "test", images, labels)
    task = registry_for(tmp_path / "toy").get("toy")
    evaluator = Evaluator(tiny_backbone, "cpu", samples=None, cache_dir=tmp_path / "cache")
    accuracy = evaluator.evaluate(None, [task])["toy"]
    data = evaluator.test_set(task)
    with torch.no_grad():
        features = F.normalize(
            tiny_backbone.model.encode_image(normalise(data.images, tiny_backbone.preprocess)), dim=-1
        )
    head = build_head(tiny_backbone, task.classnames, task.templates)
    expected = float(((features @ head.T).argmax(-1) == data.labels).float().mean())
    assert accuracy == pytest.approx(expected)


def test_loading_an_encoder_changes_predictions_and_leaves_the_backbone(tmp_path, tiny_backbone):
    images, labels = colour_images(20, seed=4)
    write_dataset(tmp_path / "toy", "test", images, labels)
    task = registry_for(tmp_path / "toy").get("toy")
    evaluator = Evaluator(tiny_backbone, "cpu", samples=None, cache_dir=tmp_path / "cache")
    before = {k: v.clone() for k, v in tiny_backbone.model.visual.state_dict().items()}
    pretrained_features = evaluator.features(evaluator.test_set(task).images)
    state = {k: v + 0.5 * torch.randn_like(v) for k, v in before.items()}
    evaluator.load_encoder(state)
    assert torch.equal(evaluator.visual.state_dict()["conv1.weight"], state["conv1.weight"])
    assert not torch.allclose(evaluator.features(evaluator.test_set(task).images), pretrained_features)
    assert all(torch.equal(v, tiny_backbone.model.visual.state_dict()[k]) for k, v in before.items())


def test_missing_dataset_split_and_columns_are_named(tmp_path, tiny_backbone):
    evaluator = Evaluator(tiny_backbone, "cpu", samples=None, cache_dir=tmp_path / "cache")
    with pytest.raises(MergingError, match=r"dataset of task toy not found: .*missing is not a folder"):
        evaluator.evaluate(None, [registry_for(tmp_path / "missing").get("toy")])
    images, labels = colour_images(5)
    write_dataset(tmp_path / "toy", "train", images, labels)
    with pytest.raises(MergingError, match="no parquet files for split 'test'"):
        evaluator.evaluate(None, [registry_for(tmp_path / "toy").get("toy")])
    write_dataset(tmp_path / "toy", "test", images, labels, label_column="target")
    with pytest.raises(MergingError, match=r"lacks column\(s\) \['image', 'label'\]"):
        evaluator.evaluate(None, [registry_for(tmp_path / "toy").get("toy")])
    (tmp_path / "toy" / "data" / "test-00000-of-00001.parquet").write_bytes(b"not parquet" * 10)
    with pytest.raises(MergingError, match=r"test-00000-of-00001.parquet is not a readable parquet file"):
        evaluator.evaluate(None, [registry_for(tmp_path / "toy").get("toy")])


def test_unknown_backbone_and_task_are_named():
    with pytest.raises(MergingError, match="unknown backbone 'vit-h'"):
        load_backbone("vit-h")
    with pytest.raises(MergingError, match="unknown task 'nope'; registered tasks: toy"):
        registry_for("x").get("nope")
