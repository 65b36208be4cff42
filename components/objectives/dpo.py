"""Diffusion-DPO (Wallace et al. 2024) as a Trainer loss: fine-tune a policy denoiser against a frozen reference.

For a preference pair (x_w, x_l) with condition c, ONE time t and ONE noise eps are drawn and shared by the
winner and the loser (variance reduction, monograph L5715):
    x_t^w = alpha(t) x_w + sigma(t) eps,   x_t^l = alpha(t) x_l + sigma(t) eps.
With per-sample mean squared errors in the model's regression space (eps for eps-prediction, v for
velocity-prediction, x0 otherwise),
    dMSE(x) = mse_policy(x) - mse_reference(x),
    inside  = -beta * (dMSE(x_t^w) - dMSE(x_t^l)),
    loss    = -log sigmoid(inside)    (mean over pairs).
This is the corrected form (reference/algorithms-distillation-alignment.md, errata: the monograph's "practical
surrogate" lacks the log-sigmoid). `beta` is the effective beta (it absorbs T * lambda_t and the original code's
factor 0.5, i.e. the diffusers-port convention: beta_here = 0.5 * beta_original). w(t) = 1.

At initialisation (policy = reference) inside is exactly 0: the loss is log 2 and the implicit accuracy
(fraction of pairs with inside > 0, ties counted as half) is 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.diffusion.schedules import Schedule, append_dims

TimeSampler = Callable[[int, torch.device], Tensor]
MSE_TARGETS = ("eps", "v", "x0")


def default_mse_target(prediction: str) -> str:
    """The regression space the model was trained in: its own prediction type when that is eps/v/x0, else x0."""
    return prediction if prediction in MSE_TARGETS else "x0"


@dataclass
class DPOTerms:
    """Per-pair quantities of one Diffusion-DPO evaluation (all shaped [B])."""

    inside: Tensor  # -beta * (dMSE_w - dMSE_l): positive when the policy prefers the winner more than the reference
    mse_policy_w: Tensor
    mse_policy_l: Tensor
    mse_ref_w: Tensor
    mse_ref_l: Tensor

    @property
    def loss(self) -> Tensor:
        """-log sigmoid(inside), averaged over pairs (softplus(-z) is its stable form)."""
        return F.softplus(-self.inside).mean()

    @property
    def implicit_accuracy(self) -> float:
        """Fraction of pairs whose implicit reward ranks the winner first; exact ties count half."""
        return float(((self.inside > 0).float() + 0.5 * (self.inside == 0).float()).mean())


def shared_noising(schedule: Schedule, x_w: Tensor, x_l: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Noise winner and loser with the SAME t [B] and the SAME eps (shaped like x_w)."""
    if x_w.shape != x_l.shape or eps.shape != x_w.shape:
        raise ValueError(f"winner {tuple(x_w.shape)}, loser {tuple(x_l.shape)} and noise {tuple(eps.shape)} "
                         "must have the same shape")
    alpha, sigma = append_dims(schedule.alpha(t), x_w).to(x_w.dtype), append_dims(schedule.sigma(t), x_w).to(x_w.dtype)
    return alpha * x_w + sigma * eps, alpha * x_l + sigma * eps


def regression_target(target: str, schedule: Schedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """The true eps, v (= alpha' x0 + sigma' eps) or x0 of a noised sample."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        da, ds = append_dims(schedule.dalpha(t), x0).to(x0.dtype), append_dims(schedule.dsigma(t), x0).to(x0.dtype)
        return da * x0 + ds * eps
    raise ValueError(f"unknown mse target {target!r}; choose one of {list(MSE_TARGETS)}")


def dpo_terms(policy: Callable[..., Tensor], reference: Callable[..., Tensor], schedule: Schedule,
              x_w: Tensor, x_l: Tensor, t: Tensor, eps: Tensor, cond: Optional[Tensor], beta: float,
              target: str = "eps") -> DPOTerms:
    """Evaluate Diffusion-DPO on pairs at given shared times t [B] and noise eps; see the module docstring.

    Winner and loser go through each network in ONE batched call ([x_t^w; x_t^l], times [t; t]), so both see
    exactly the same t. The reference runs without gradients.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got beta={beta}")
    if target not in MSE_TARGETS:
        raise ValueError(f"unknown mse target {target!r}; choose one of {list(MSE_TARGETS)}")
    n = x_w.shape[0]
    xt_w, xt_l = shared_noising(schedule, x_w, x_l, t, eps)
    x_t = torch.cat([xt_w, xt_l])
    t2 = torch.cat([t, t])
    cond2 = None if cond is None else torch.cat([cond, cond])
    truth = regression_target(target, schedule, torch.cat([x_w, x_l]), torch.cat([eps, eps]), t2)
    pred = policy(x_t, t2, cond2, target=target)
    with torch.no_grad():
        pred_ref = reference(x_t, t2, cond2, target=target)
    mse = ((pred - truth) ** 2).flatten(1).mean(1)
    mse_ref = ((pred_ref - truth) ** 2).flatten(1).mean(1)
    delta_w = mse[:n] - mse_ref[:n]
    delta_l = mse[n:] - mse_ref[n:]
    inside = -beta * (delta_w - delta_l)
    return DPOTerms(inside, mse[:n], mse[n:], mse_ref[:n], mse_ref[n:])


class DiffusionDPOObjective:
    """Trainer loss_fn for Diffusion-DPO.

    Args:
        reference: the frozen reference denoiser (same schedule and prediction as the policy); its parameters
            are set to requires_grad=False.
        beta: effective beta (> 0); larger keeps the policy closer to the reference.
        time_sampler: draws training times [B] (use the reference's training objective's distribution).
        target: regression space of the MSE (see `default_mse_target`).

    Batches: {"x": winners [B, ...], "x_loser": losers [B, ...], "y": labels [B] or None}.
    Metrics: loss, implicit_accuracy, mse_w / mse_l (policy), reward_margin (mean inside / beta).
    """

    def __init__(self, reference: nn.Module, beta: float, time_sampler: TimeSampler, target: str = "eps") -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got beta={beta}")
        if target not in MSE_TARGETS:
            raise ValueError(f"unknown mse target {target!r}; choose one of {list(MSE_TARGETS)}")
        self.reference = reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.schedule: Schedule = reference.schedule
        self.beta = float(beta)
        self.time_sampler = time_sampler
        self.target = target

    def __call__(self, model: Callable[..., Tensor], batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        missing = [k for k in ("x", "x_loser") if k not in batch]
        if missing:
            raise ValueError(f"a DPO batch needs keys 'x' (winners) and 'x_loser', missing {missing}")
        x_w, x_l = batch["x"], batch["x_loser"]
        t = self.time_sampler(x_w.shape[0], x_w.device).to(x_w.dtype)
        eps = torch.randn_like(x_w)  # one noise per pair, shared by winner and loser
        terms = dpo_terms(model, self.reference, self.schedule, x_w, x_l, t, eps, batch.get("y"), self.beta,
                          self.target)
        loss = terms.loss
        return loss, {"implicit_accuracy": terms.implicit_accuracy,
                      "mse_w": float(terms.mse_policy_w.detach().mean()),
                      "mse_l": float(terms.mse_policy_l.detach().mean()),
                      "reward_margin": float(terms.inside.detach().mean()) / self.beta}
