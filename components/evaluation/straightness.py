"""Straightness of a model's sampling paths: the one definition, used by the evaluate stage and by reflow's round
reports. Euler on a grid uniform in flow time s = sigma / (alpha + sigma), states mapped to the flow frame
y = x / (alpha + sigma), where every (alpha, sigma) path reads y_s = (1 - s) x0 + s eps; the model's own guidance
applies (a guided teacher is judged on the paths it samples)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from components.diffusion.guidance import guided_if_needed
from components.diffusion.samplers import sample
from components.evaluation.metrics import straightness_per_path
from components.evaluation.uncertainty import Estimate


def flow_time_grid(schedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Times t (descending, t_max -> t_end) whose flow times s = sigma / (alpha + sigma) are uniform; returns (t, s)."""
    ends = torch.tensor([schedule.t_max, schedule.t_end], dtype=torch.float64)
    s_ends = schedule.sigma(ends) / (schedule.alpha(ends) + schedule.sigma(ends))
    s = torch.linspace(float(s_ends[0]), float(s_ends[1]), steps + 1, dtype=torch.float64)
    inner = s[1:-1]
    times = torch.cat([ends[:1], schedule.t_of_log_snr(torch.log((1 - inner) / inner)).to(torch.float64), ends[1:]])
    return times, s


def straightness_grid(steps: int) -> str:
    """How path_straightness samples, in words (the evaluate stage's manifest)."""
    return (f"euler, {steps} steps uniform in flow time s = sigma/(alpha+sigma), states in the flow frame "
            "x/(alpha+sigma)")


def flow_frame_trajectory(model, noise: torch.Tensor, cond: Optional[torch.Tensor],
                          steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Euler PF-ODE states on the flow-time-uniform grid, mapped to the flow frame y = x / (alpha + sigma) (where any
    (alpha, sigma) path reads y_s = (1 - s) x0 + s eps); returns (states, s)."""
    times, s = flow_time_grid(model.schedule, steps)
    denoiser = guided_if_needed(model.denoiser, float(model.spec["sampler"].get("guidance", 1.0)), cond,
                                model.num_classes)
    with torch.no_grad():
        result = sample(denoiser, model.schedule, times, noise, method="euler", cond=cond, return_trajectory=True)
    scale = model.schedule.alpha(times) + model.schedule.sigma(times)
    return [x / float(c) for x, c in zip(result.trajectory, scale)], s


def path_straightness(model, noise: torch.Tensor, cond: Optional[torch.Tensor] = None,
                      steps: int = 32) -> tuple[Estimate, list[torch.Tensor]]:
    """THE straightness of a model (the one definition, used by evaluate and reflow): Euler on `steps` steps uniform
    in flow time, states in the flow frame, S = int_0^1 E||(y_1 - y_0) - dy/ds||^2 ds; mean over paths with its
    95% interval. Returns (estimate, flow-frame states)."""
    states, s = flow_frame_trajectory(model, noise, cond, steps)
    per_path = straightness_per_path(states, s).numpy()
    half = 1.959963984540054 * per_path.std(ddof=1) / math.sqrt(len(per_path))
    mean = float(per_path.mean())
    return Estimate(mean, max(0.0, mean - half), mean + half), states
