"""The mini benchmark's recipe bench (scripts/minibench/lab.py): its pure parts on inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scripts.minibench.lab import (
    DEFAULT_RECIPE,
    finetune,
    parse_recipe,
    recipe_name,
    spectral_accumulation,
    upsampled,
)

BLOCK = "transformer.resblocks.0."


def test_a_recipe_overrides_only_the_keys_given_with_their_types_and_names_itself_by_them():
    recipe = parse_recipe("lr=1e-4,steps=4000,schedule=constant")
    assert recipe["lr"] == 1e-4 and recipe["steps"] == 4000 and recipe["schedule"] == "constant"
    assert isinstance(recipe["steps"], int) and recipe["batch"] == DEFAULT_RECIPE["batch"]
    assert recipe_name(recipe) == "lr=0.0001,schedule=constant,steps=4000"
    assert recipe_name(parse_recipe("")) == "default"
    with pytest.raises(SystemExit, match="unknown recipe key 'momentum'"):
        parse_recipe("momentum=0.9")


def _state(c_fc: torch.Tensor) -> dict[str, torch.Tensor]:
    return {BLOCK + "mlp.c_fc.weight": c_fc, BLOCK + "ln_1.weight": torch.ones(c_fc.shape[1])}


def test_spectral_accumulation_is_one_over_root_t_for_disjoint_leading_directions_and_root_t_for_a_shared_one():
    t, m, n = 4, 12, 8
    pre = _state(torch.zeros(m, n))
    eye_m, eye_n = torch.eye(m), torch.eye(n)
    disjoint = [_state(torch.outer(eye_m[i], eye_n[i])) for i in range(t)]  # orthogonal rank-one task matrices
    assert spectral_accumulation(pre, disjoint)["mlp.c_fc"] == pytest.approx(1 / math.sqrt(t))
    shared = [_state(torch.outer(eye_m[0], eye_n[0])) for _ in range(t)]  # the same leading direction in every task
    assert spectral_accumulation(pre, shared)["mlp.c_fc"] == pytest.approx(math.sqrt(t))


class _Tower(nn.Module):
    """The smallest image tower finetune() accepts: a trainable layer and a frozen projection."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3 * 32 * 32, 4)
        self.proj = nn.Parameter(torch.eye(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1)) @ self.proj


def test_finetune_takes_exactly_the_steps_asked_for_leaves_the_projection_and_keeps_a_constant_rate():
    torch.manual_seed(0)
    tower = _Tower()
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = np.arange(10) % 2
    head = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    steps, seen = [], []
    optimiser_step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        seen.append(self.param_groups[0]["lr"])
        return optimiser_step(self, *args, **kwargs)

    proj = tower.proj.detach().clone()
    recipe = parse_recipe("lr=1e-3,schedule=constant,batch=4,steps=7,wd_per_step=0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", counted)
        finetune(tower, head, 20.0, images, labels, recipe, seed=0)
    assert len(steps) == 7  # 2.5 batches per pass over the 10 images: the loop stops mid-pass
    assert seen == [1e-3] * 7
    assert torch.equal(tower.proj, proj)


def test_upsampling_from_low_resolution_keeps_the_shape_and_loses_only_fine_detail():
    rows = torch.arange(32).view(1, 1, 32, 1).expand(2, 3, 32, 32)
    checker = ((rows + rows.transpose(2, 3)) % 2 * 255).to(torch.uint8)  # the finest detail there is
    ramp = (rows * 8).to(torch.uint8)  # coarse: a slow gradient
    assert torch.equal(upsampled(checker, 32), checker)  # captured at full size: unchanged
    blurred = upsampled(checker, 16)
    assert blurred.shape == checker.shape and blurred.dtype == torch.uint8
    assert blurred.float().std() < 5 < checker.float().std()  # the checkerboard averages out to grey
    assert (upsampled(ramp, 16).float() - ramp.float()).abs()[..., 2:-2, :].max() <= 8  # the gradient stays
