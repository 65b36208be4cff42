"""Consistency models in EDM coordinates: the boundary-shifted parameterisation, the Karras grid, one teacher
Heun step and the pseudo-Huber distance. Multistep sampling is the samplers' method "consistency".

Any denoiser (on any schedule) is viewed in EDM coordinates by the exact reparametrisation
x_edm = x_t / alpha(t), sigma_edm = sigma(t) / alpha(t) (same log-SNR). For the flow path (alpha = 1 - t,
sigma = t) this is x_edm = x / (1 - t), sigma = t / (1 - t), i.e. t = sigma / (1 + sigma).

Consistency function (Song et al. 2023; reference notes 6.1, boundary at sigma_min, not 0):
    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma),
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),  c_out = sd (sigma - sigma_min) / sqrt(sigma^2 + sd^2),
so f(x, sigma_min) = x exactly (c_skip = 1, c_out = 0). F is the EDM "F" implied by a wrapped denoiser D:
F = (D - c_skip_edm x) / c_out_edm; a student initialised from the teacher thus starts at (almost) the
teacher's x0 prediction, and c_out / c_out_edm simplifies to (sigma - sigma_min) / sigma.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from components.diffusion.grids import make_grid
from components.diffusion.samplers import heun_step
from components.diffusion.schedules import Schedule, append_dims, make_schedule

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0

EdmDenoiseFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def schedule_time_of_sigma(schedule: Schedule, sigma: Tensor) -> Tensor:
    """Time t of `schedule` whose scaled noise level sigma(t) / alpha(t) equals the EDM `sigma` (> 0)."""
    return schedule.t_of_log_snr(-torch.log(sigma.to(torch.float64))).to(sigma.dtype)


def edm_denoise(denoiser: Callable[..., Tensor], schedule: Schedule, x_edm: Tensor, sigma: Tensor,
                cond: Optional[Tensor] = None) -> Tensor:
    """x0_hat of `denoiser` (trained on `schedule`) at the EDM point (x_edm, sigma), sigma shaped [B]."""
    t = schedule_time_of_sigma(schedule, sigma)
    alpha = schedule.alpha(t.to(torch.float64)).to(x_edm.dtype)
    return denoiser(append_dims(alpha, x_edm) * x_edm, t.to(x_edm.dtype), cond)


def consistency_scalings(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of the boundary-shifted parameterisation; exactly (1, 0) at sigma = sigma_min."""
    # Written as 1 / (1 + r^2) so that r = 0 gives exactly 1 (torch evaluates scalar / tensor as a reciprocal
    # times the scalar, which rounds sd^2 / sd^2 to 1 - 1e-16).
    c_skip = 1.0 / (1.0 + ((sigma - sigma_min) / sigma_data) ** 2)
    c_out = sigma_data * (sigma - sigma_min) / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out


class ConsistencyFunction(nn.Module):
    """f(x_edm, sigma, cond) -> x0 estimate with f(x, sigma_min) = x exactly, wrapping a denoiser.

    Args:
        denoiser: a `Denoiser` (net + its own schedule); its weights are the consistency model's weights.
        sigma_min, sigma_max: EDM noise range; sampling starts at x = sigma_max * noise.
    Seen by samplers as a denoiser on `self.schedule` (EDM, t = sigma). Times below sigma_min are clamped to
    sigma_min (where f is the identity).
    """

    def __init__(self, denoiser: nn.Module, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> None:
        super().__init__()
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"consistency needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.denoiser = denoiser
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(denoiser.sigma_data)
        self.schedule = make_schedule("edm", t_min=self.sigma_min, t_max=self.sigma_max)

    def forward(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None, target: str = "x0") -> Tensor:
        if target != "x0":
            raise ValueError(f"a consistency function only returns target 'x0', got target={target!r}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.clamp(min=self.sigma_min)
        x0_hat = edm_denoise(self.denoiser, self.denoiser.schedule, x, sigma, cond)
        c_skip, _ = consistency_scalings(sigma, self.sigma_data, self.sigma_min)
        c_skip_edm = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        out_ratio = (sigma - self.sigma_min) / sigma  # c_out / c_out_edm
        return append_dims(c_skip, x) * x + append_dims(out_ratio, x) * (x0_hat - append_dims(c_skip_edm, x) * x)


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> Tensor:
    """The n ascending noise levels sigma_1 = sigma_min < ... < sigma_n = sigma_max (Karras rho-grid, float64)."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n_scales must be an integer >= 2, got {n!r}")
    grid = make_grid("edm", make_schedule("edm", t_min=sigma_min, t_max=sigma_max), n, rho=rho)
    return grid[:-1].flip(0)


def heun_edm_step(denoise: EdmDenoiseFn, x: Tensor, sigma_from: Tensor, sigma_to: Tensor,
                  cond: Optional[Tensor] = None) -> Tensor:
    """One Heun step of the EDM PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma_from to sigma_to > 0
    (per-sample [B] noise levels; the samplers' one Heun step)."""
    return heun_step(lambda y, s: (y - denoise(y, s, cond)) / append_dims(s, y), x, sigma_from, sigma_to)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample sqrt(||a - b||^2 + c^2) - c (iCT's distance; ~ squared L2 / 2c near 0, L2 far away)."""
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    sq = (a - b).flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c


def default_huber_c(dim: int) -> float:
    """iCT's c = 0.00054 sqrt(dim) (dim = numbers per sample)."""
    return 0.00054 * math.sqrt(dim)
