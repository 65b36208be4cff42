"""Conversions between the four prediction targets at a point (x_t, t) of any schedule.

With x_t = alpha x0 + sigma eps:
  x0    the clean-data estimate E[x0 | x_t]
  eps   the noise estimate E[eps | x_t]
  v     the velocity dx_t/dt = alpha' x0 + sigma' eps (PF-ODE drift in our time convention)
  score grad log p_t(x_t) = -eps / sigma      (Tweedie: x0 = (x_t + sigma^2 score) / alpha)

Every conversion goes through the pair (x0, eps), which (x_t, any one target) determines.
`t` is a [B] tensor, a 0-d tensor or a python float; coefficients are computed in t's dtype
(float64 for python floats) and cast to x_t's dtype.
"""

from __future__ import annotations

from torch import Tensor

from components.diffusion.schedules import Schedule, TimeLike, append_dims, as_time

TARGETS = ("x0", "eps", "v", "score")


def _check_kind(kind: str) -> None:
    if kind not in TARGETS:
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of {list(TARGETS)}")


def _coefficients(schedule: Schedule, t: TimeLike, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    t = as_time(t).to(like.device)
    return tuple(append_dims(f(t), like) for f in (schedule.alpha, schedule.sigma, schedule.dalpha, schedule.dsigma))


def x0_eps_from(kind: str, value: Tensor, x_t: Tensor, t: TimeLike, schedule: Schedule) -> tuple[Tensor, Tensor]:
    """Recover (x0, eps) from the point x_t and one prediction `value` of type `kind`."""
    _check_kind(kind)
    alpha, sigma, dalpha, dsigma = _coefficients(schedule, t, x_t)
    if kind == "x0":
        return value, (x_t - alpha * value) / sigma
    if kind == "eps":
        return (x_t - sigma * value) / alpha, value
    if kind == "score":
        eps = -sigma * value
        return (x_t + sigma * sigma * value) / alpha, eps
    # kind == "v": solve [alpha sigma; alpha' sigma'] [x0; eps] = [x_t; v].
    det = alpha * dsigma - sigma * dalpha
    return (dsigma * x_t - sigma * value) / det, (alpha * value - dalpha * x_t) / det


def from_x0_eps(kind: str, x0: Tensor, eps: Tensor, t: TimeLike, schedule: Schedule) -> Tensor:
    """Express the pair (x0, eps) at time t as a prediction of type `kind`."""
    _check_kind(kind)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    alpha, sigma, dalpha, dsigma = _coefficients(schedule, t, x0)
    if kind == "score":
        return -eps / sigma
    return dalpha * x0 + dsigma * eps


def convert(value: Tensor, from_kind: str, to_kind: str, x_t: Tensor, t: TimeLike, schedule: Schedule) -> Tensor:
    """Convert a prediction from one target type to another ("x0", "eps", "v", "score").

    A conversion to the same kind returns `value` itself (no round-off).
    """
    _check_kind(from_kind)
    _check_kind(to_kind)
    if from_kind == to_kind:
        return value
    x0, eps = x0_eps_from(from_kind, value, x_t, t, schedule)
    return from_x0_eps(to_kind, x0, eps, t, schedule)


def x0_to_v(x0: Tensor, x_t: Tensor, t: TimeLike, schedule: Schedule) -> Tensor:
    """v = alpha' x0 + sigma' (x_t - alpha x0) / sigma (the PF-ODE velocity for a denoiser output)."""
    return convert(x0, "x0", "v", x_t, t, schedule)
