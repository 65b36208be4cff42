"""ODE/SDE samplers over a time grid for any denoiser D(x_t, t, cond) -> x0_hat and any schedule.

Methods (registry `SAMPLERS`):
  "euler"          Euler on the PF-ODE dx/dt = v = alpha' x0_hat + sigma' eps_hat (first order).
  "heun"           EDM's Heun (second order); the step that lands on sigma = 0 is an Euler step.
  "ddim"           DDIM with eta (eta = 0 deterministic, first order; eta = 1 is DDPM ancestral).
  "dpmpp_2m"       DPM-Solver++(2M) in log-SNR (second order multistep; first order on the last
                   step when it lands on sigma = 0 and on the first step).
  "edm_stochastic" EDM's Heun with churn (S_churn, S_min, S_max, S_noise); the noise level is raised
                   in the scaled (x / alpha) space, which is EDM's rule when alpha = 1.
  "consistency"    multistep consistency sampling for a consistency function seen as a denoiser: x0 = f(x, t),
                   then re-noise to the next time, x = alpha x0 + sqrt(sigma^2 - sigma(t_min)^2) z (one call a step).
`sample` takes the time grid as times, or as a grid kind ("edm", "uniform", "logsnr") plus `steps`
(`sampling_grid`: for "consistency" the grid's last noise level t_min is dropped, since f is the identity there).
Sampling starts at x = sigma(grid[0]) * noise (grid[0] = t_max for grids from make_grid). NFE is the
number of denoiser calls times the denoiser's `nfe_per_call` (2 for classifier-free guidance).
Gradients are not disabled here: wrap calls in torch.no_grad() when none are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from components.diffusion.grids import make_grid
from components.diffusion.schedules import Schedule, append_dims

DenoiseFn = Callable[[Tensor, float], Tensor]
RecordFn = Callable[[Tensor], None]


@dataclass
class SampleResult:
    """Output of `sample`: final samples, NFE per sample, optional trajectory, and the grid used."""

    x: Tensor
    nfe: int
    trajectory: list[Tensor] | None
    times: Tensor


def _scalars(schedule: Schedule, t: float) -> tuple[float, float]:
    t64 = torch.tensor(t, dtype=torch.float64)
    return float(schedule.alpha(t64)), float(schedule.sigma(t64))


def ddim_noise_scale(schedule: Schedule, s: float, t: float, eta: float) -> float:
    """Std of the fresh noise in a stochastic DDIM step s -> t (t < s), corrected per the errata:

    c = eta * (sigma_t / sigma_s) * sqrt(sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2);
    for VP this is eta * sqrt((1 - abar_t)/(1 - abar_s) * (1 - abar_s/abar_t)), and eta = 1 gives
    the DDPM posterior std.
    """
    if eta == 0.0:
        return 0.0
    alpha_s, sigma_s = _scalars(schedule, s)
    alpha_t, sigma_t = _scalars(schedule, t)
    if sigma_t == 0.0:
        return 0.0
    conditional_var = max(sigma_s**2 - (alpha_s / alpha_t) ** 2 * sigma_t**2, 0.0)
    return min(eta * sigma_t / sigma_s * math.sqrt(conditional_var), sigma_t)


def ddim_step(
    x: Tensor, x0_hat: Tensor, s: float, t: float, schedule: Schedule, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """One DDIM step from time s to t < s: alpha_t x0_hat + sqrt(sigma_t^2 - c^2) eps_hat + c z."""
    alpha_s, sigma_s = _scalars(schedule, s)
    alpha_t, sigma_t = _scalars(schedule, t)
    eps_hat = (x - alpha_s * x0_hat) / sigma_s
    c = ddim_noise_scale(schedule, s, t, eta)
    out = alpha_t * x0_hat + math.sqrt(max(sigma_t**2 - c**2, 0.0)) * eps_hat
    if c > 0.0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        out = out + c * noise
    return out


def _velocity(denoise: DenoiseFn, schedule: Schedule, x: Tensor, t: float) -> Tensor:
    """v = alpha' x0 + sigma' (x - alpha x0) / sigma, as x0_to_v, with the coefficients combined as python
    floats (float64) first: two tensor ops per step instead of a dozen on 0-d tensors (the per-step cost of
    euler/heun at small batch, benchmarks/bench_samplers.py)."""
    t64 = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = float(schedule.alpha(t64)), float(schedule.sigma(t64))
    dalpha, dsigma = float(schedule.dalpha(t64)), float(schedule.dsigma(t64))
    return (dalpha - dsigma * alpha / sigma) * denoise(x, t) + (dsigma / sigma) * x


def heun_step(velocity: Callable[[Tensor, Tensor | float], Tensor], x: Tensor, t: Tensor | float,
              t_next: Tensor | float, euler_only: bool = False) -> Tensor:
    """One Heun (EDM, second order) step of dx/dt = velocity(x, t) from t to t_next; times are floats or
    per-sample [B] tensors. `euler_only`: stop after the Euler predictor (the velocity is undefined at sigma = 0)."""
    step = append_dims(t_next - t, x) if isinstance(t_next, Tensor) else t_next - t
    d = velocity(x, t)
    x_euler = x + step * d
    if euler_only:
        return x_euler
    return x + step * 0.5 * (d + velocity(x_euler, t_next))


def _heun_step(denoise: DenoiseFn, schedule: Schedule, x: Tensor, t: float, t_next: float) -> Tensor:
    return heun_step(lambda y, time: _velocity(denoise, schedule, y, time), x, t, t_next,
                     euler_only=_scalars(schedule, t_next)[1] == 0.0)


def _euler(denoise: DenoiseFn, schedule: Schedule, grid: list[float], x: Tensor, record: RecordFn, generator) -> Tensor:
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * _velocity(denoise, schedule, x, t)
        record(x)
    return x


def _heun(denoise: DenoiseFn, schedule: Schedule, grid: list[float], x: Tensor, record: RecordFn, generator) -> Tensor:
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = _heun_step(denoise, schedule, x, t, t_next)
        record(x)
    return x


def _ddim(
    denoise: DenoiseFn, schedule: Schedule, grid: list[float], x: Tensor, record: RecordFn, generator, eta: float = 0.0
) -> Tensor:
    if eta < 0:
        raise ValueError(f"ddim eta must be >= 0, got {eta}")
    for s, t in zip(grid[:-1], grid[1:]):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if eta > 0 else None
        x = ddim_step(x, denoise(x, s), s, t, schedule, eta=eta, noise=noise)
        record(x)
    return x


def _dpmpp_2m(denoise: DenoiseFn, schedule: Schedule, grid: list[float], x: Tensor, record: RecordFn, generator) -> Tensor:
    log_snr = schedule.log_snr(torch.tensor(grid, dtype=torch.float64)).tolist()
    previous_x0: Tensor | None = None
    previous_h = math.inf
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        x0 = denoise(x, t)
        _, sigma_t = _scalars(schedule, t)
        alpha_next, sigma_next = _scalars(schedule, t_next)
        h = log_snr[i + 1] - log_snr[i]
        if previous_x0 is None or sigma_next == 0.0:
            combined = x0
        else:
            # Second-order multistep correction, r = h_i / h_{i-1} (AB2 weights on a uniform log-SNR grid).
            half_ratio = 0.5 * h / previous_h
            combined = (1.0 + half_ratio) * x0 - half_ratio * previous_x0
        x = (sigma_next / sigma_t) * x - alpha_next * math.expm1(-h) * combined
        previous_x0, previous_h = x0, h
        record(x)
    return x


def _edm_stochastic(
    denoise: DenoiseFn,
    schedule: Schedule,
    grid: list[float],
    x: Tensor,
    record: RecordFn,
    generator,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
) -> Tensor:
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"edm_stochastic needs S_churn >= 0 and S_noise >= 0, got S_churn={S_churn}, S_noise={S_noise}")
    n_steps = len(grid) - 1
    gamma_max = min(S_churn / n_steps, math.sqrt(2.0) - 1.0)
    for t, t_next in zip(grid[:-1], grid[1:]):
        t_hat = t
        alpha_t, sigma_t = _scalars(schedule, t)
        if gamma_max > 0 and S_min <= t <= S_max and alpha_t > 0:
            # Raise the scaled noise level sigma/alpha by (1 + gamma), i.e. lower log-SNR by log(1 + gamma).
            lam_hat = schedule.log_snr(torch.tensor(t, dtype=torch.float64)) - math.log1p(gamma_max)
            t_hat = min(float(schedule.t_of_log_snr(lam_hat)), schedule.t_max)
            alpha_hat, sigma_hat = _scalars(schedule, t_hat)
            if alpha_hat > 0 and t_hat > t:
                added_std = math.sqrt(max((sigma_hat / alpha_hat) ** 2 - (sigma_t / alpha_t) ** 2, 0.0))
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = (alpha_hat / alpha_t) * x + alpha_hat * added_std * S_noise * z
            else:
                t_hat = t
        x = _heun_step(denoise, schedule, x, t_hat, t_next)
        record(x)
    return x


def _consistency(denoise: DenoiseFn, schedule: Schedule, grid: list[float], x: Tensor, record: RecordFn,
                 generator) -> Tensor:
    sigma_floor = _scalars(schedule, schedule.t_min)[1]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x0 = denoise(x, t)
        alpha_next, sigma_next = _scalars(schedule, t_next)
        if sigma_next == 0.0:
            x = x0
        else:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = alpha_next * x0 + math.sqrt(max(sigma_next**2 - sigma_floor**2, 0.0)) * z
        record(x)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": _euler,
    "heun": _heun,
    "ddim": _ddim,
    "dpmpp_2m": _dpmpp_2m,
    "edm_stochastic": _edm_stochastic,
    "consistency": _consistency,
}
SAMPLER_OPTIONS: dict[str, frozenset[str]] = {
    "euler": frozenset(),
    "heun": frozenset(),
    "ddim": frozenset({"eta"}),
    "dpmpp_2m": frozenset(),
    "edm_stochastic": frozenset({"S_churn", "S_min", "S_max", "S_noise"}),
    "consistency": frozenset(),
}
_TWO_EVALS_PER_STEP = ("heun", "edm_stochastic")


def _check_method(method: str) -> None:
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {sorted(SAMPLERS)}")


def _check_grid(grid: Tensor | list[float]) -> list[float]:
    times = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if times.numel() < 2:
        raise ValueError(f"grid needs at least 2 times (n_steps >= 1), got {times.numel()}")
    if not bool(torch.all(times[1:] < times[:-1])) or float(times[-1]) < 0:
        raise ValueError(f"grid must be strictly descending and >= 0, got {times.tolist()}")
    return times.tolist()


def sampling_grid(method: str, kind: str, schedule: Schedule, steps: int) -> Tensor:
    """The descending times of `steps` steps of `method` on a grid of `kind` (see grids.make_grid).

    "consistency": the noise levels of a (steps + 1)-step grid without its last one, t_min (f(x, t_min) = x):
    [t_max, inner..., t_end]; with kind "edm" these are the consistency-models paper's Karras points."""
    _check_method(method)
    if method == "consistency":
        times = make_grid(kind, schedule, steps + 1)
        return torch.cat([times[:-2], times[-1:]])
    return make_grid(kind, schedule, steps)


def sample(
    denoiser: Callable[..., Tensor],
    schedule: Schedule,
    grid: Tensor | list[float] | str,
    noise: Tensor,
    *,
    method: str,
    steps: int | None = None,
    cond: Tensor | None = None,
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
    **opts: float,
) -> SampleResult:
    """Integrate from x = sigma(grid[0]) * noise down the descending `grid` with `method`.

    Args:
        denoiser: D(x, t, cond) -> x0_hat with t a [B] tensor (x's dtype).
        schedule: the schedule the denoiser was trained with.
        grid: descending times (n_steps + 1 of them), or a grid kind ("edm", "uniform", "logsnr") with `steps`.
        steps: number of steps when `grid` is a kind.
        noise: standard normal tensor [B, ...]; its dtype is the compute dtype.
        method: a key of SAMPLERS.
        cond: labels [B] passed to every denoiser call (or None).
        return_trajectory: also return x at every grid time, starting point included.
        generator: RNG for the fresh noise of stochastic methods.
        **opts: method options (ddim: eta; edm_stochastic: S_churn, S_min, S_max, S_noise).
    """
    _check_method(method)
    unknown = set(opts) - SAMPLER_OPTIONS[method]
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for sampler {method!r}; allowed: {sorted(SAMPLER_OPTIONS[method])}")
    if isinstance(grid, str):
        if steps is None:
            raise ValueError(f"grid kind {grid!r} needs `steps`")
        grid = sampling_grid(method, grid, schedule, steps)
    times = _check_grid(grid)
    calls = 0

    def denoise(x: Tensor, t: float) -> Tensor:
        nonlocal calls
        calls += 1
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        return denoiser(x, t_batch, cond)

    trajectory: list[Tensor] | None = [] if return_trajectory else None

    def record(x: Tensor) -> None:
        if trajectory is not None:
            trajectory.append(x.detach().clone())

    x = _scalars(schedule, times[0])[1] * noise
    record(x)
    x = SAMPLERS[method](denoise, schedule, times, x, record, generator, **opts)
    nfe = calls * int(getattr(denoiser, "nfe_per_call", 1))
    return SampleResult(x=x, nfe=nfe, trajectory=trajectory, times=torch.tensor(times, dtype=torch.float64))


def nfe_of(method: str, n_steps: int, ends_at_zero: bool = True) -> int:
    """Denoiser evaluations per sample (without guidance) for `n_steps` steps of `method`.

    Heun-type methods cost 2 per step, minus 1 when the last step lands on sigma = 0.
    """
    _check_method(method)
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if method in _TWO_EVALS_PER_STEP:
        return 2 * n_steps - (1 if ends_at_zero else 0)
    return n_steps


def steps_for_nfe(method: str, nfe: int, ends_at_zero: bool = True) -> int:
    """Largest number of steps whose cost nfe_of(method, steps) does not exceed `nfe`."""
    _check_method(method)
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if method in _TWO_EVALS_PER_STEP:
        steps = (nfe + 1) // 2 if ends_at_zero else nfe // 2
        if steps < 1:
            raise ValueError(f"nfe={nfe} is below one step of {method!r} ({nfe_of(method, 1, ends_at_zero)} NFE)")
        return steps
    return nfe
