"""The evaluator's batch size: about CPU_TOKENS_PER_BATCH tokens on the CPU, and the same accuracies.

A batch's matrix products may take another kernel or another split across threads, so the
features of one image can change in the last bits with the batch size (about 1e-7); what a
run reports, the accuracies, must not.
"""

from __future__ import annotations

import pytest
import torch

from merging.evaluation.backbones import MINI, Backbone, Preprocess, load_backbone
from merging.evaluation.evaluator import (
    CPU_BATCH_WITHOUT_TOKENS,
    CPU_TOKENS_PER_BATCH,
    CUDA_BATCH,
    Evaluator,
    default_batch_size,
)
from merging.evaluation.tasks import registry


def test_cpu_batches_hold_about_the_token_budget_and_cuda_batches_are_large():
    cpu = torch.device("cpu")
    assert default_batch_size(cpu, 17) == CPU_TOKENS_PER_BATCH // 17 == 120  # the mini tower: 4 × 4 patches + 1
    assert default_batch_size(cpu, 50) == 40  # ViT-B/32 at 224 px
    assert default_batch_size(cpu, 257) == 7  # ViT-L/14
    assert default_batch_size(cpu, 10_000) == 1  # never zero
    assert default_batch_size(torch.device("cuda"), 17) == CUDA_BATCH


def test_a_tower_without_patch_tokens_gets_a_batch_too(tmp_path):
    """open_clip builds towers other than ViTs (a ResNet has no positional embedding): the
    evaluator still starts, so that whatever is wrong with using them is said where it is."""
    model = torch.nn.Module()
    model.visual = torch.nn.Conv2d(3, 4, 3)
    backbone = Backbone("resnet-like", model, None, Preprocess(32), "fingerprint")
    assert default_batch_size(torch.device("cpu"), None) == CPU_BATCH_WITHOUT_TOKENS
    assert Evaluator(backbone, "cpu", cache_dir=tmp_path).batch_size == CPU_BATCH_WITHOUT_TOKENS


@pytest.mark.parametrize("threads", [1, 2])
def test_the_batch_size_changes_features_only_in_the_last_bits(tmp_path, threads):
    backbone = load_backbone(MINI)
    images = torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        default = Evaluator(backbone, "cpu", cache_dir=tmp_path)
        assert default.batch_size == 120
        features = default.features(images)  # three batches: 120, 120, 10
        for batch_size in (1, 7, 250, 500):
            other = Evaluator(backbone, "cpu", cache_dir=tmp_path, batch_size=batch_size).features(images)
            assert torch.allclose(other, features, rtol=0, atol=1e-6), batch_size
    finally:
        torch.set_num_threads(before)


def test_the_batch_size_does_not_change_an_accuracy(tmp_path):
    """The pretrained tower on every mini-8 task, in the default batches and in the old 500."""
    backbone = load_backbone(MINI)
    tasks = [registry().get(name) for name in registry().task_set("mini-8")]
    default = Evaluator(backbone, "cpu", cache_dir=tmp_path).evaluate(None, tasks)
    old = Evaluator(backbone, "cpu", cache_dir=tmp_path, batch_size=500).evaluate(None, tasks)
    assert default == old
