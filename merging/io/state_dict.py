"""Arithmetic on state dicts: the task-vector algebra every method is built from.

In the spirit of Ilharco et al.'s ``task_vectors``: a model is a mapping from parameter
name to tensor, and a task vector is the difference of two such mappings. Functions
here are pure (they never modify their inputs) and work key by key, so that the largest
temporary is one parameter, never a whole flattened model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def squared_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str]) -> float:
    """``‖a − b‖²`` over ``keys`` as if all parameters were flattened into one vector.

    Each parameter's norm is taken in float32 (torch sums pairwise, so it is accurate to
    about 1e-7 relative) and the squares are accumulated in Python's float64 across
    parameters, so the result does not degrade with the number of parameters.
    """
    total = 0.0
    for k in keys:
        total += float(torch.linalg.vector_norm(a[k].float() - b[k].float())) ** 2
    return total


def distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str]) -> float:
    """``‖a − b‖`` over ``keys``: the task-vector norm when ``b`` is the pretrained model."""
    return squared_distance(a, b, keys) ** 0.5
