"""Consistency distillation (CD) and consistency training (CT) losses (Song et al. 2023; reference notes 6.1).

On the Karras grid sigma_1 = sigma_min < ... < sigma_N = sigma_max (EDM coordinates, see
components/diffusion/consistency.py), pick i uniformly in {1, ..., N-1}, noise x_{i+1} = x0 + sigma_{i+1} eps,
and step to sigma_i:
  distill: one Heun step of the teacher's PF-ODE (two teacher calls);
  train:   the one-point estimate x0 + sigma_i eps with the same (x0, eps) (no teacher).
Loss: pseudo-Huber( f_theta(x_{i+1}, sigma_{i+1}), f_target(x~_i, sigma_i) ), weight 1, where the target
network is an EMA of the student (decay `target_ema`, CM's "fixed" schedule) or the student itself under
stop-gradient (`target: stopgrad`, iCT).

The trained module is a `ConsistencyPair` (student + frozen target copy) so the target is checkpointed and
restored with the student; `ConsistencyPair.student_state_dict` extracts what gets exported.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from components.diffusion.consistency import (ConsistencyFunction, default_huber_c, edm_denoise, heun_edm_step,
                                               karras_sigmas, pseudo_huber)
from components.diffusion.schedules import append_dims

MODES = ("distill", "train")
TARGETS = ("ema", "stopgrad")


class ConsistencyPair(nn.Module):
    """The student consistency function and its target copy (parameters frozen, moved by `update_target`)."""

    def __init__(self, student: ConsistencyFunction) -> None:
        super().__init__()
        self.student = student
        self.target = copy.deepcopy(student)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return self.student(x, sigma, cond)

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """target <- decay * target + (1 - decay) * student (decay 0: an exact copy, i.e. stop-gradient)."""
        targets = list(self.target.parameters())
        students = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(targets, students, 1.0 - decay)

    @staticmethod
    def student_state_dict(pair_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The student's weights (keys without the "student." prefix) from a pair's state dict (e.g. its EMA)."""
        prefix = "student."
        return {k[len(prefix):]: v for k, v in pair_state.items() if k.startswith(prefix)}


class ConsistencyObjective:
    """loss_fn(engine, batch) for the Trainer; `engine` wraps a `ConsistencyPair`.

    Args:
        mode: "distill" (needs `teacher`) or "train".
        teacher: the frozen teacher denoiser (any schedule; viewed in EDM coordinates).
        sigma_min, sigma_max, n_scales, rho: the Karras grid.
        target: "ema" (decay `target_ema`) or "stopgrad".
        huber_c: pseudo-Huber constant; None: 0.00054 sqrt(dim).
    """

    def __init__(self, mode: str = "distill", teacher: Optional[nn.Module] = None, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, n_scales: int = 18, rho: float = 7.0, target: str = "ema",
                 target_ema: float = 0.95, huber_c: Optional[float] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"consistency mode must be one of {list(MODES)}, got mode={mode!r}")
        if mode == "distill" and teacher is None:
            raise ValueError("consistency mode 'distill' needs a teacher, got teacher=None")
        if target not in TARGETS:
            raise ValueError(f"consistency target must be one of {list(TARGETS)}, got target={target!r}")
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"target_ema must be in [0, 1), got target_ema={target_ema}")
        self.mode, self.teacher = mode, teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.sigmas = karras_sigmas(n_scales, sigma_min, sigma_max, rho)
        self.target_decay = target_ema if target == "ema" else 0.0
        self.huber_c = huber_c

    def teacher_denoise(self, x: Tensor, sigma: Tensor, cond: Optional[Tensor]) -> Tensor:
        return edm_denoise(self.teacher, self.teacher.schedule, x, sigma, cond)

    def step_target_point(self, x0: Tensor, eps: Tensor, x_next: Tensor, sigma_next: Tensor, sigma: Tensor,
                          cond: Optional[Tensor]) -> Tensor:
        """x~ at sigma: the teacher's Heun step from (x_next, sigma_next) or, for CT, x0 + sigma eps."""
        if self.mode == "train":
            return x0 + append_dims(sigma, x0) * eps
        with torch.no_grad():
            return heun_edm_step(self.teacher_denoise, x_next, sigma_next, sigma, cond)

    def __call__(self, engine: Any, batch: dict) -> tuple[Tensor, dict[str, float]]:
        pair: ConsistencyPair = engine.module if hasattr(engine, "module") else engine
        pair.update_target(self.target_decay)  # after the previous optimizer step (a no-op at step 1)
        x0, cond = batch["x"], batch.get("y")
        n = x0.shape[0]
        sigmas = self.sigmas.to(device=x0.device, dtype=x0.dtype)
        index = torch.randint(0, len(sigmas) - 1, (n,), device=x0.device)
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        eps = torch.randn_like(x0)
        x_next = x0 + append_dims(sigma_next, x0) * eps
        x_tilde = self.step_target_point(x0, eps, x_next, sigma_next, sigma, cond)
        with torch.no_grad():
            target = pair.target(x_tilde, sigma, cond)
        prediction = engine(x_next, sigma_next, cond)
        c = self.huber_c if self.huber_c is not None else default_huber_c(math.prod(x0.shape[1:]))
        distance = pseudo_huber(prediction, target, c)
        loss = distance.mean()
        return loss, {"l2_to_target": float((prediction - target).detach().flatten(1).norm(dim=1).mean())}
