"""Denoising objectives for training a teacher; each follows the Trainer's loss_fn contract.

    objective(model, batch) -> (loss, metrics)

`model` is the teacher's Denoiser (or an engine wrapping one), called as
model(x_t, t, cond, target=...); it must be built with `objective.schedule_name` and
`objective.prediction`. `batch` is {"x": x0 [B, ...], "y": labels [B] or None}.
Times and noise come from torch's global RNG (the Trainer seeds it).

  "edm":  EDM schedule, ln t ~ N(P_mean, P_std^2), loss (1/c_out^2) ||D - x0||^2 (unit weight in F space).
  "eps":  DDPM: VP cosine schedule, t ~ U[t_min, t_max], loss ||eps_hat - eps||^2, prediction "eps".
  "flow": flow matching: flow schedule, t ~ U(0, 1), velocity target dx_t/dt = eps - x0, loss ||v_hat - v||^2.
Losses are means over all elements (per-sample mean over dimensions, then over the batch).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from components.diffusion.denoiser import precondition
from components.diffusion.schedules import Schedule, append_dims, make_schedule

Batch = dict[str, Any]


class DenoisingObjective:
    """Shared machinery: label dropout, noising, and the weighted regression loss.

    Args:
        schedule_name: schedule the teacher is trained with.
        prediction: what the teacher's network predicts (passed to its Denoiser).
        p_uncond: probability of replacing a label by the null label num_classes (classifier-free guidance).
        num_classes: number of classes (needed when p_uncond > 0).
        schedule_kwargs: passed to make_schedule.
    """

    name = "base"

    def __init__(
        self,
        schedule_name: str,
        prediction: str,
        p_uncond: float = 0.0,
        num_classes: int | None = None,
        schedule_kwargs: dict[str, float] | None = None,
    ) -> None:
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        if p_uncond > 0 and num_classes is None:
            raise ValueError("p_uncond > 0 needs num_classes (the null label), got num_classes=None")
        self.schedule_name = schedule_name
        self.prediction = prediction
        self.schedule: Schedule = make_schedule(schedule_name, **(schedule_kwargs or {}))
        self.p_uncond = float(p_uncond)
        self.num_classes = num_classes

    def drop_labels(self, labels: Tensor | None) -> Tensor | None:
        """Replace each label by the null label num_classes with probability p_uncond."""
        if labels is None or self.p_uncond == 0.0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.p_uncond
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def sample_times(self, batch_size: int, device: torch.device) -> Tensor:
        raise NotImplementedError

    def loss_terms(self, model: Callable[..., Tensor], x0: Tensor, x_t: Tensor, eps: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """Return (per-element squared error, per-sample weight [B])."""
        raise NotImplementedError

    def __call__(self, model: Callable[..., Tensor], batch: Batch) -> tuple[Tensor, dict[str, float]]:
        if "x" not in batch:
            raise ValueError(f"batch needs key 'x', got keys {sorted(batch)}")
        x0 = batch["x"]
        cond = self.drop_labels(batch.get("y"))
        t = self.sample_times(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        alpha, sigma = append_dims(self.schedule.alpha(t), x0), append_dims(self.schedule.sigma(t), x0)
        x_t = alpha * x0 + sigma * eps
        squared_error, weight = self.loss_terms(model, x0, x_t, eps, t, cond)
        per_sample = squared_error.flatten(1).mean(1)
        loss = (weight * per_sample).mean()
        return loss, {"loss": float(loss.detach()), "mse": float(per_sample.detach().mean())}


class EDMObjective(DenoisingObjective):
    """EDM loss: ln t ~ N(P_mean, P_std^2), weight 1/c_out^2 on ||D(x_t) - x0||^2 (Karras et al. 2022)."""

    name = "edm"

    def __init__(
        self, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2, p_uncond: float = 0.0, num_classes: int | None = None
    ) -> None:
        if sigma_data <= 0 or P_std <= 0:
            raise ValueError(f"edm objective needs sigma_data > 0 and P_std > 0, got sigma_data={sigma_data}, P_std={P_std}")
        super().__init__("edm", "edm", p_uncond, num_classes)
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)

    def sample_times(self, batch_size: int, device: torch.device) -> Tensor:
        return torch.exp(self.P_mean + self.P_std * torch.randn(batch_size, device=device))

    def loss_terms(self, model, x0, x_t, eps, t, cond):
        x0_hat = model(x_t, t, cond, target="x0")
        _, c_out, _, _ = precondition(self.schedule, t, self.sigma_data)
        return (x0_hat - x0) ** 2, c_out.to(x0.dtype) ** -2


class EpsObjective(DenoisingObjective):
    """DDPM's simple loss ||eps_hat - eps||^2 on the VP cosine schedule, t ~ U[t_min, t_max]."""

    name = "eps"

    def __init__(self, p_uncond: float = 0.0, num_classes: int | None = None, **schedule_kwargs: float) -> None:
        super().__init__("vp_cosine", "eps", p_uncond, num_classes, schedule_kwargs)

    def sample_times(self, batch_size: int, device: torch.device) -> Tensor:
        low, high = self.schedule.t_min, self.schedule.t_max
        return low + (high - low) * torch.rand(batch_size, device=device)

    def loss_terms(self, model, x0, x_t, eps, t, cond):
        eps_hat = model(x_t, t, cond, target="eps")
        return (eps_hat - eps) ** 2, torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device)


class FlowObjective(DenoisingObjective):
    """Flow matching on x_t = (1 - t) x0 + t eps, t ~ U(0, 1): ||v_hat - (eps - x0)||^2."""

    name = "flow"

    def __init__(self, p_uncond: float = 0.0, num_classes: int | None = None) -> None:
        super().__init__("flow", "v", p_uncond, num_classes)

    def sample_times(self, batch_size: int, device: torch.device) -> Tensor:
        return torch.rand(batch_size, device=device)

    def loss_terms(self, model, x0, x_t, eps, t, cond):
        v_hat = model(x_t, t, cond, target="v")
        return (v_hat - (eps - x0)) ** 2, torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device)


OBJECTIVES: dict[str, type[DenoisingObjective]] = {"edm": EDMObjective, "eps": EpsObjective, "flow": FlowObjective}


def make_objective(name: str, **kwargs: Any) -> DenoisingObjective:
    """Build a denoising objective by name ("edm", "eps", "flow"); kwargs go to its constructor."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad argument for objective {name!r}: {error}") from None
