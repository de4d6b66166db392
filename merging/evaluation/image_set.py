"""A set of preprocessed images and their labels: what the evaluator caches and data-driven methods learn from.

Kept in a module of its own (torch only), so that methods can name it without importing
the dataset readers (pyarrow, PIL, torchvision).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ImageSet:
    """Preprocessed images (uint8, N × 3 × H × W, before normalisation) and their labels (N)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())
