"""Classifier-free guidance: the documented convention, one batched call, 2 NFE per call."""

import pytest
import torch

from components.diffusion.grids import make_grid
from components.diffusion.guidance import guided
from components.diffusion.samplers import nfe_of, sample
from components.diffusion.schedules import make_schedule

NULL = 3  # num_classes = 3, so label 3 is "no label"


class LabelShiftDenoiser:
    """D(x, t, c) = x / 2 + c (a different, known output per label; the null label gives x/2 + 3)."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, cond=None):
        self.batch_sizes.append(x.shape[0])
        return 0.5 * x + cond.to(x.dtype)[:, None]


def test_w_one_is_conditional_w_zero_unconditional_and_w_two_extrapolates():
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    base = LabelShiftDenoiser()
    conditional = 0.5 * x + labels[:, None]
    unconditional = 0.5 * x + NULL
    torch.testing.assert_close(guided(base, 1.0, NULL)(x, t, labels), conditional)
    torch.testing.assert_close(guided(base, 0.0, NULL)(x, t, labels), unconditional)
    torch.testing.assert_close(guided(base, 2.0, NULL)(x, t, labels), 2 * conditional - unconditional)


def test_both_branches_run_in_one_batched_call():
    base = LabelShiftDenoiser()
    guided(base, 3.0, NULL)(torch.zeros(5, 2), torch.ones(5), torch.zeros(5, dtype=torch.long))
    assert base.batch_sizes == [10]


def test_sampler_counts_two_nfe_per_guided_call():
    schedule = make_schedule("edm")
    base = LabelShiftDenoiser()
    grid = make_grid("edm", schedule, 4)
    labels = torch.tensor([0, 2])
    result = sample(guided(base, 1.5, NULL), schedule, grid, torch.randn(2, 2, dtype=torch.float64), method="heun", cond=labels)
    assert len(base.batch_sizes) == nfe_of("heun", 4)
    assert result.nfe == 2 * nfe_of("heun", 4)


def test_guidance_rejects_bad_input():
    with pytest.raises(ValueError, match="w must be >= 0"):
        guided(LabelShiftDenoiser(), -1.0, NULL)
    with pytest.raises(ValueError, match="needs cond"):
        guided(LabelShiftDenoiser(), 1.0, NULL)(torch.zeros(1, 2), torch.ones(1))
