"""Sampling time grids: descending float64 times from t_max down to the schedule's end time."""

from __future__ import annotations

import torch
from torch import Tensor

from components.diffusion.schedules import LOG_SNR_CLAMP, Schedule

GRID_KINDS = ("edm", "uniform", "logsnr")


def make_grid(kind: str, schedule: Schedule, n_steps: int, rho: float = 7.0) -> Tensor:
    """Return n_steps + 1 descending float64 times starting at schedule.t_max.

    kinds:
      "edm":     n_steps times spaced uniformly in t^(1/rho) from t_max to t_min, then t_end
                 (Karras et al.'s grid with t_N = 0).
      "logsnr":  n_steps times spaced uniformly in log-SNR from t_max to t_min, then t_end
                 (geometric in sigma for EDM; the rho -> infinity limit of "edm").
      "uniform": n_steps + 1 times spaced uniformly in t from t_max to t_end.
    With n_steps = 1 every kind is [t_max, t_end].
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; choose one of {list(GRID_KINDS)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    t_max, t_min, t_end = schedule.t_max, schedule.t_min, schedule.t_end
    if kind == "uniform":
        return torch.linspace(t_max, t_end, n_steps + 1, dtype=torch.float64)
    fraction = torch.linspace(0.0, 1.0, n_steps, dtype=torch.float64)
    if kind == "edm":
        inner = (t_max ** (1 / rho) + fraction * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    else:
        # Clamped so a schedule whose log-SNR is infinite at t_max (flow: alpha(1) = 0) still gives a grid.
        ends = schedule.log_snr(torch.tensor([t_max, t_min], dtype=torch.float64))
        lam_start, lam_stop = ends.clamp(-LOG_SNR_CLAMP, LOG_SNR_CLAMP).unbind()
        inner = schedule.t_of_log_snr(lam_start + fraction * (lam_stop - lam_start))
        if n_steps == 1:
            inner = torch.tensor([t_max], dtype=torch.float64)
    inner[0] = t_max  # exact start: the sampler's prior scale is sigma(grid[0])
    return torch.cat([inner, torch.tensor([t_end], dtype=torch.float64)])
