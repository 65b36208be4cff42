"""Exact closed forms for data whose noisy marginals are known: for tests and benchmarks.

For data x0 ~ N(mu, s^2 I) under x_t = alpha x0 + sigma eps, with R = alpha^2 s^2 + sigma^2:
  p_t = N(alpha mu, R I),  score = -(x - alpha mu)/R,
  E[x0|x] = mu + alpha s^2 (x - alpha mu)/R,  E[eps|x] = sigma (x - alpha mu)/R,
and the PF-ODE flow map is affine: Psi_{s->t}(x) = alpha_t mu + sqrt(R_t/R_s) (x - alpha_s mu).
A mixture sum_k pi_k N(mu_k, s_k^2 I) has denoiser sum_k w_k(x) E_k[x0|x] with responsibilities
w_k ∝ pi_k N(x; alpha mu_k, R_k I); s_k = 0 gives point masses (a finite training set).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from components.diffusion.conversions import TARGETS, from_x0_eps, x0_eps_from
from components.diffusion.schedules import Schedule, TimeLike, append_dims, as_time

OracleDenoiser = Callable[..., Tensor]


def _batch_times(x: Tensor, t: TimeLike) -> Tensor:
    t = as_time(t).to(device=x.device, dtype=torch.float64)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class GaussianMixture:
    """Isotropic Gaussian mixture sum_k weights_k N(means_k, stds_k^2 I) in D dimensions.

    Args:
        weights: [K] mixture weights (normalised here).
        means: [K, D] component means.
        stds: [K] component standard deviations (0 allowed: point masses).
    Computations run in float64 and return x's dtype.
    """

    def __init__(self, weights: Tensor, means: Tensor, stds: Tensor) -> None:
        weights, means, stds = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, stds))
        if means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(means.shape)}")
        if weights.shape != (means.shape[0],) or stds.shape != (means.shape[0],):
            raise ValueError(f"weights and stds must be [{means.shape[0]}], got {tuple(weights.shape)} and {tuple(stds.shape)}")
        if bool((weights <= 0).any()) or bool((stds < 0).any()):
            raise ValueError("weights must be > 0 and stds >= 0")
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def mean(self) -> Tensor:
        """Mixture mean [D]."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance [D, D]."""
        centred = self.means - self.mean()
        within = (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        return within + centred.T @ (self.weights[:, None] * centred)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw n samples; returns (x [n, D] float64, component index [n])."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[component] + self.stds[component, None] * noise, component

    def responsibilities(self, x: Tensor, t: TimeLike, schedule: Schedule) -> Tensor:
        """Posterior component probabilities w_k(x_t) [B, K]."""
        t = _batch_times(x, t)
        alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        variance = (alpha**2 * self.stds**2 + sigma**2).clamp_min(1e-300)  # [B, K]
        x64 = x.to(torch.float64).flatten(1)
        squared = ((x64[:, None, :] - alpha[:, :, None] * self.means[None]) ** 2).sum(-1)
        log_density = torch.log(self.weights) - 0.5 * squared / variance - 0.5 * self.dim * torch.log(2 * math.pi * variance)
        return torch.softmax(log_density, dim=1)

    def denoise(self, x: Tensor, t: TimeLike, schedule: Schedule) -> Tensor:
        """Exact E[x0 | x_t = x] (x of shape [B, D])."""
        t = _batch_times(x, t)
        alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        variance = (alpha**2 * self.stds**2 + sigma**2).clamp_min(1e-300)  # [B, K]
        x64 = x.to(torch.float64).flatten(1)[:, None, :]
        per_component = self.means[None] + (alpha * self.stds**2 / variance)[:, :, None] * (x64 - alpha[:, :, None] * self.means[None])
        resp = self.responsibilities(x, t, schedule)
        return (resp[:, :, None] * per_component).sum(1).reshape(x.shape).to(x.dtype)

    def predict(self, x: Tensor, t: TimeLike, schedule: Schedule, target: str = "x0") -> Tensor:
        """Exact prediction of `target` in ("x0", "eps", "v", "score") at (x, t)."""
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
        t = _batch_times(x, t)
        x0 = self.denoise(x, t, schedule)
        return from_x0_eps(target, *x0_eps_from("x0", x0, x, t, schedule), t, schedule)

    def denoiser(self, schedule: Schedule) -> OracleDenoiser:
        """The exact denoiser as a callable D(x, t, cond=None, target="x0") (cond is ignored)."""

        def exact(x: Tensor, t: TimeLike, cond: Tensor | None = None, target: str = "x0") -> Tensor:
            return self.predict(x, t, schedule, target)

        return exact


class GaussianData(GaussianMixture):
    """Data N(mu, std^2 I): a one-component mixture with a closed-form flow map.

    Args:
        mu: mean [D] (a python float gives D = 1).
        std: standard deviation (> 0).
    """

    def __init__(self, mu: Tensor | float, std: float) -> None:
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        mu = torch.as_tensor(mu, dtype=torch.float64).reshape(1, -1)
        super().__init__(torch.ones(1, dtype=torch.float64), mu, torch.tensor([float(std)], dtype=torch.float64))
        self.mu = mu[0]
        self.std = float(std)

    def marginal_variance(self, t: TimeLike, schedule: Schedule) -> Tensor:
        """R(t) = alpha^2 std^2 + sigma^2, the per-dimension variance of p_t."""
        t = as_time(t).to(torch.float64)
        return schedule.alpha(t) ** 2 * self.std**2 + schedule.sigma(t) ** 2

    def flow_map(self, x: Tensor, s: TimeLike, t: TimeLike, schedule: Schedule) -> Tensor:
        """Exact PF-ODE map Psi_{s->t}(x) = alpha_t mu + sqrt(R_t / R_s) (x - alpha_s mu)."""
        s, t = _batch_times(x, s), _batch_times(x, t)
        x64 = x.to(torch.float64)
        ratio = torch.sqrt(self.marginal_variance(t, schedule) / self.marginal_variance(s, schedule))
        mu = self.mu.reshape(1, *x.shape[1:])
        alpha_s, alpha_t = append_dims(schedule.alpha(s), x64), append_dims(schedule.alpha(t), x64)
        return (alpha_t * mu + append_dims(ratio, x64) * (x64 - alpha_s * mu)).to(x.dtype)


class PointMasses(GaussianMixture):
    """Dirac mixture sum_k weights_k delta(points_k): the exact denoiser of a finite training set."""

    def __init__(self, points: Tensor, weights: Tensor | None = None) -> None:
        points = torch.as_tensor(points, dtype=torch.float64)
        if points.ndim != 2:
            raise ValueError(f"points must be [K, D], got shape {tuple(points.shape)}")
        if weights is None:
            weights = torch.ones(points.shape[0], dtype=torch.float64)
        super().__init__(weights, points, torch.zeros(points.shape[0], dtype=torch.float64))
