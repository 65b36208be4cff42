"""Noise schedules: x_t = alpha(t) * x0 + sigma(t) * eps, data at t = 0, noise at t = t_max.

Every schedule gives alpha, sigma, their time derivatives, the half log-SNR
lambda(t) = log(alpha / sigma) and its inverse. All methods take a tensor (or a python
float, turned into a float64 tensor) and return a tensor of the same shape and dtype, so
coefficients can be computed in float64 from a time grid and cast to the data's dtype.
The ends are handled without NaN: sigma(0) = 0 gives lambda = +inf, alpha = 0 (flow at
t = 1) gives lambda = -inf, and a derivative that blows up at t = 0 (VP) gives +inf.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

TimeLike = Tensor | float
# |log-SNR| bound used wherever a finite value is needed at a schedule's ends (c_noise, log-SNR grids).
LOG_SNR_CLAMP = 20.0


def as_time(t: TimeLike) -> Tensor:
    """Return `t` as a floating tensor (python numbers become float64 tensors)."""
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


def append_dims(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample values [B] (or a 0-d scalar) so they broadcast against `like` [B, ...]."""
    if values.ndim == 0:
        return values.to(like.dtype)
    return values.to(like.dtype).reshape(values.shape[0], *([1] * (like.ndim - 1)))


class Schedule:
    """Base class: subclasses implement alpha, sigma, dalpha, dsigma and t_of_log_snr.

    Attributes:
        name: registry name of the schedule.
        t_min: smallest time used by noise-level grids (the last non-zero grid time).
        t_max: the noise end; sampling starts at x = sigma(t_max) * noise.
        t_end: time at which a sampling grid ends (0 for every built-in schedule).
        affine: alpha and sigma are affine in t (EDM, flow). Then a deterministic DDIM step is exactly an Euler
            step: alpha(t') x0 + sigma(t') eps = x + (t' - t)(alpha' x0 + sigma' eps) when alpha', sigma' are constant.
    """

    name: str = "base"
    t_min: float
    t_max: float
    t_end: float = 0.0
    affine: bool = False

    def alpha(self, t: TimeLike) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: TimeLike) -> Tensor:
        raise NotImplementedError

    def dalpha(self, t: TimeLike) -> Tensor:
        """d alpha / dt."""
        raise NotImplementedError

    def dsigma(self, t: TimeLike) -> Tensor:
        """d sigma / dt."""
        raise NotImplementedError

    def log_snr(self, t: TimeLike) -> Tensor:
        """Half log signal-to-noise ratio lambda(t) = log(alpha(t) / sigma(t)), decreasing in t."""
        t = as_time(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_of_log_snr(self, lam: TimeLike) -> Tensor:
        """Inverse of log_snr: the time at which lambda(t) = lam."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min}, t_max={self.t_max})"


class EDMSchedule(Schedule):
    """EDM / variance-exploding: alpha = 1, sigma = t, t in [t_min, t_max] (Karras et al. 2022)."""

    name = "edm"
    affine = True

    def __init__(self, t_min: float = 0.002, t_max: float = 80.0) -> None:
        if not 0.0 < t_min < t_max:
            raise ValueError(f"edm schedule needs 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t: TimeLike) -> Tensor:
        return torch.ones_like(as_time(t))

    def sigma(self, t: TimeLike) -> Tensor:
        return as_time(t).clone()

    def dalpha(self, t: TimeLike) -> Tensor:
        return torch.zeros_like(as_time(t))

    def dsigma(self, t: TimeLike) -> Tensor:
        return torch.ones_like(as_time(t))

    def log_snr(self, t: TimeLike) -> Tensor:
        return -torch.log(as_time(t))

    def t_of_log_snr(self, lam: TimeLike) -> Tensor:
        return torch.exp(-as_time(lam))


class VPCosineSchedule(Schedule):
    """Variance-preserving cosine schedule (improved DDPM) in continuous time, t in [0, 1).

    alpha_bar(t) = cos^2(theta(t)) / cos^2(theta(0)) with theta(t) = (t + s) / (1 + s) * pi / 2,
    alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar). t_max < 1 keeps alpha(t_max) > 0.
    """

    name = "vp_cosine"

    def __init__(self, t_min: float = 1e-4, t_max: float = 0.999, s: float = 0.008) -> None:
        if not 0.0 < t_min < t_max < 1.0:
            raise ValueError(f"vp_cosine schedule needs 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        if s <= 0.0:
            raise ValueError(f"vp_cosine offset s must be > 0, got s={s}")
        self.t_min, self.t_max, self.s = float(t_min), float(t_max), float(s)
        self._theta0 = s / (1.0 + s) * math.pi / 2.0
        self._dtheta = math.pi / (2.0 * (1.0 + s))

    def _theta(self, t: TimeLike) -> Tensor:
        return (as_time(t) + self.s) * self._dtheta

    def alpha(self, t: TimeLike) -> Tensor:
        return torch.cos(self._theta(t)) / math.cos(self._theta0)

    def sigma(self, t: TimeLike) -> Tensor:
        theta = self._theta(t)
        # 1 - cos^2(th)/cos^2(th0) = sin(th - th0) sin(th + th0) / cos^2(th0): no cancellation near t = 0.
        product = torch.sin(theta - self._theta0) * torch.sin(theta + self._theta0)
        return torch.sqrt(product.clamp_min(0.0)) / math.cos(self._theta0)

    def dalpha(self, t: TimeLike) -> Tensor:
        return -torch.sin(self._theta(t)) * self._dtheta / math.cos(self._theta0)

    def dsigma(self, t: TimeLike) -> Tensor:
        t = as_time(t)
        # alpha^2 + sigma^2 = 1  =>  sigma' = -alpha alpha' / sigma (+inf at t = 0).
        return -self.alpha(t) * self.dalpha(t) / self.sigma(t)

    def t_of_log_snr(self, lam: TimeLike) -> Tensor:
        lam = as_time(lam)
        # VP: alpha^2 = sigmoid(2 lam), sigma^2 = sigmoid(-2 lam); atan2 is well conditioned at both ends.
        cos_theta = torch.sqrt(torch.sigmoid(2.0 * lam)) * math.cos(self._theta0)
        sin_theta = torch.sqrt(math.sin(self._theta0) ** 2 + torch.sigmoid(-2.0 * lam) * math.cos(self._theta0) ** 2)
        return torch.atan2(sin_theta, cos_theta) / self._dtheta - self.s


class VPLinearSchedule(Schedule):
    """Variance-preserving SDE with linear beta(t) = beta_min + t (beta_max - beta_min), t in [t_min, 1].

    alpha = exp(-B(t)/2), sigma = sqrt(1 - exp(-B(t))), B(t) = beta_min t + (beta_max - beta_min) t^2 / 2.
    """

    name = "vp_linear"

    def __init__(self, t_min: float = 1e-5, t_max: float = 1.0, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0.0 < t_min < t_max:
            raise ValueError(f"vp_linear schedule needs 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        if not 0.0 < beta_min < beta_max:
            raise ValueError(f"vp_linear needs 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.beta_min, self.beta_d = float(beta_min), float(beta_max - beta_min)

    def _integral_beta(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * self.beta_d * t * t

    def _beta(self, t: Tensor) -> Tensor:
        return self.beta_min + self.beta_d * t

    def alpha(self, t: TimeLike) -> Tensor:
        return torch.exp(-0.5 * self._integral_beta(as_time(t)))

    def sigma(self, t: TimeLike) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._integral_beta(as_time(t))))

    def dalpha(self, t: TimeLike) -> Tensor:
        t = as_time(t)
        return -0.5 * self._beta(t) * self.alpha(t)

    def dsigma(self, t: TimeLike) -> Tensor:
        t = as_time(t)
        return 0.5 * self._beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def log_snr(self, t: TimeLike) -> Tensor:
        big_b = self._integral_beta(as_time(t))
        return -0.5 * big_b - 0.5 * torch.log(-torch.expm1(-big_b))

    def t_of_log_snr(self, lam: TimeLike) -> Tensor:
        lam = as_time(lam)
        big_b = torch.nn.functional.softplus(-2.0 * lam)  # exp(-B) = sigmoid(2 lam)
        # Positive root of (beta_d/2) t^2 + beta_min t - B = 0, written without cancellation.
        return 2.0 * big_b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * self.beta_d * big_b))


class FlowSchedule(Schedule):
    """Linear (flow matching / rectified flow) path: alpha = 1 - t, sigma = t, t in [0, 1]."""

    name = "flow"
    affine = True

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0) -> None:
        if not 0.0 < t_min < t_max <= 1.0:
            raise ValueError(f"flow schedule needs 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t: TimeLike) -> Tensor:
        return 1.0 - as_time(t)

    def sigma(self, t: TimeLike) -> Tensor:
        return as_time(t).clone()

    def dalpha(self, t: TimeLike) -> Tensor:
        return -torch.ones_like(as_time(t))

    def dsigma(self, t: TimeLike) -> Tensor:
        return torch.ones_like(as_time(t))

    def t_of_log_snr(self, lam: TimeLike) -> Tensor:
        # (1 - t) / t = exp(lam)  =>  t = sigmoid(-lam).
        return torch.sigmoid(-as_time(lam))


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "edm": EDMSchedule,
    "vp_cosine": VPCosineSchedule,
    "vp_linear": VPLinearSchedule,
    "flow": FlowSchedule,
}


def make_schedule(name: str, **kwargs: float) -> Schedule:
    """Build a schedule by name ("edm", "vp_cosine", "vp_linear", "flow"); kwargs go to its constructor."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[name](**kwargs)
    except TypeError as error:  # an unexpected keyword: report it as bad input, in one line
        raise ValueError(f"bad argument for schedule {name!r}: {error}") from None
