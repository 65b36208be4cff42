"""Progressive distillation (Salimans & Ho 2022; reference notes section 5): one round teaches a student to
do in one DDIM step what the teacher does in two.

Grid: the schedule's uniform grid (make_grid("uniform")) of 2N teacher steps; the student samples with DDIM on
the uniform grid of N steps, whose times are the teacher's even grid points. For the flow path (alpha = 1 - t,
sigma = t) uniform in t is the natural grid and keeps every step's denominator alpha_t sigma_s - alpha_s sigma_t
= s - t > 0, including s = 1 (alpha = 0) and t = 0 (sigma = 0).

For s = t_{2j}, u = t_{2j+1}, t = t_{2j+2}, with x_s = alpha_s x0 + sigma_s eps and two teacher DDIM steps
(x-prediction form) x_s -> x~_u -> x~_t, the target is the x0 that makes ONE DDIM step s -> t land on x~_t:
    x~ = (sigma_s x~_t - sigma_t x_s) / (alpha_t sigma_s - alpha_s sigma_t).
Loss: w(s) ||x0_student(x_s, s) - x~||^2 with w = max(SNR_s, 1) ("truncated SNR"), or SNR_s + 1, or 1.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from components.diffusion.grids import make_grid
from components.diffusion.schedules import Schedule, append_dims

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "constant")


def ddim_x0_step(x_s: Tensor, x0_hat: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor,
                 sigma_t: Tensor) -> Tensor:
    """Deterministic DDIM step s -> t in x-prediction form: (sigma_t/sigma_s) x_s + (alpha_t - alpha_s sigma_t/sigma_s) x0_hat.

    Coefficients are per-sample tensors [B] (or scalars)."""
    ratio = append_dims(sigma_t / sigma_s, x_s)
    return ratio * x_s + (append_dims(alpha_t, x_s) - append_dims(alpha_s, x_s) * ratio) * x0_hat


def implied_x0(x_s: Tensor, x_t: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """The x0_hat for which ddim_x0_step(x_s, x0_hat, s -> t) == x_t (inverse of the affine step)."""
    denominator = append_dims(alpha_t * sigma_s - alpha_s * sigma_t, x_s)
    return (append_dims(sigma_s, x_s) * x_t - append_dims(sigma_t, x_s) * x_s) / denominator


def coefficients(schedule: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha(t), sigma(t)) computed in float64 and cast to `like`'s dtype."""
    t64 = t.to(torch.float64)
    return schedule.alpha(t64).to(like.dtype), schedule.sigma(t64).to(like.dtype)


def two_step_target(teacher: Callable[..., Tensor], schedule: Schedule, x_s: Tensor, s: Tensor, u: Tensor,
                    t: Tensor, cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Two teacher DDIM steps s -> u -> t from x_s; returns (x0 target of the one-step student, x~_t)."""
    a_s, s_s = coefficients(schedule, s, x_s)
    a_u, s_u = coefficients(schedule, u, x_s)
    a_t, s_t = coefficients(schedule, t, x_s)
    x_u = ddim_x0_step(x_s, teacher(x_s, s.to(x_s.dtype), cond), a_s, s_s, a_u, s_u)
    x_t = ddim_x0_step(x_u, teacher(x_u, u.to(x_s.dtype), cond), a_u, s_u, a_t, s_t)
    return implied_x0(x_s, x_t, a_s, s_s, a_t, s_t), x_t


def snr_weight(weighting: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample loss weight of an x0 regression at (alpha, sigma)."""
    if weighting == "constant":
        return torch.ones_like(alpha)
    snr = alpha**2 / sigma**2
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    if weighting == "snr_plus_one":
        return snr + 1.0
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")


class ProgressiveObjective:
    """loss_fn(engine, batch) of one round: the student (an x0-predicting denoiser on `schedule`) learns the
    N-step sampler from the teacher's 2N-step DDIM sampler.

    Args:
        teacher: frozen denoiser D(x, t, cond) -> x0_hat (the previous round's student, or the teacher).
        schedule: the schedule both are sampled on.
        student_steps: N, the student's number of DDIM steps.
        weighting: "truncated_snr" (default), "snr_plus_one" or "constant".
    """

    def __init__(self, teacher: Any, schedule: Schedule, student_steps: int, weighting: str = "truncated_snr") -> None:
        if not isinstance(student_steps, int) or student_steps < 1:
            raise ValueError(f"student_steps must be an integer >= 1, got {student_steps!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
        self.teacher, self.schedule = teacher, schedule
        if isinstance(teacher, torch.nn.Module):
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.student_steps, self.weighting = student_steps, weighting
        self.teacher_grid = make_grid("uniform", schedule, 2 * student_steps)

    def __call__(self, engine: Any, batch: dict) -> tuple[Tensor, dict[str, float]]:
        x0, cond = batch["x"], batch.get("y")
        n = x0.shape[0]
        grid = self.teacher_grid.to(x0.device)
        j = torch.randint(0, self.student_steps, (n,), device=x0.device)
        s, u, t = grid[2 * j], grid[2 * j + 1], grid[2 * j + 2]
        a_s, s_s = coefficients(self.schedule, s, x0)
        x_s = append_dims(a_s, x0) * x0 + append_dims(s_s, x0) * torch.randn_like(x0)
        with torch.no_grad():
            target, _ = two_step_target(self.teacher, self.schedule, x_s, s, u, t, cond)
        prediction = engine(x_s, s.to(x0.dtype), cond)
        per_sample = (prediction - target).flatten(1).pow(2).mean(1)
        loss = (snr_weight(self.weighting, a_s, s_s) * per_sample).mean()
        return loss, {"x0_mse": float(per_sample.detach().mean())}
