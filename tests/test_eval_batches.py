"""The evaluator's batch size: about CPU_TOKENS_PER_BATCH tokens on the CPU, with the same features as before."""

from __future__ import annotations

import torch

from merging.evaluation.backbones import MINI, load_backbone
from merging.evaluation.evaluator import CPU_TOKENS_PER_BATCH, CUDA_BATCH, Evaluator, default_batch_size


def test_cpu_batches_hold_about_the_token_budget_and_cuda_batches_are_large():
    cpu = torch.device("cpu")
    assert default_batch_size(cpu, 17) == CPU_TOKENS_PER_BATCH // 17 == 120  # the mini tower: 4 × 4 patches + 1
    assert default_batch_size(cpu, 50) == 40  # ViT-B/32 at 224 px
    assert default_batch_size(cpu, 257) == 7  # ViT-L/14
    assert default_batch_size(cpu, 10_000) == 1  # never zero
    assert default_batch_size(torch.device("cuda"), 17) == CUDA_BATCH


def test_the_batch_size_does_not_change_a_single_feature(tmp_path):
    backbone = load_backbone(MINI)
    images = torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    default = Evaluator(backbone, "cpu", cache_dir=tmp_path)
    assert default.batch_size == 120
    features = default.features(images)  # three batches: 120, 120, 10
    # (a batch of one image can differ by 1e-7: its matrix products take another kernel)
    for batch_size in (7, 64, 250, 500):
        other = Evaluator(backbone, "cpu", cache_dir=tmp_path, batch_size=batch_size)
        assert torch.equal(other.features(images), features), batch_size
