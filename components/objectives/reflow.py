"""Rectified flow (reflow) objectives and coupling diagnostics, in the project's time convention.

A coupling is a set of pairs (z, x): z the noise end (t = 1), x the data end (t = 0), e.g. x = teacher ODE(z).
Reflow regresses a velocity model on the straight interpolation between the two ends:

    x_t = (1 - t) x + t z,   t ~ U(0, 1),   target dx_t/dt = z - x,   loss ||v_hat(x_t, t) - (z - x)||^2

(the notes' FM convention has noise at t = 0 and target x1 - x0; ours runs the other way, errata [fix] in
reference/algorithms-training.md section 4). Both objectives follow the Trainer's loss_fn(model, batch) contract
with batch {"x": data end, "z": noise end, "y": labels or None}; `model` is a Denoiser (prediction "v", flow
schedule) called as model(x_t, t, cond, target="v").

What a zero loss means: the coupling is a fixed point of Rectify (its straight paths do not cross), NOT that it is
optimal transport. `coupling_diagnostics` reports the loss next to the transport cost and an empirical OT cost, and
never calls a coupling optimal (the rotation counterexample, algorithms-training.md section 4 / 7.5).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from components.diffusion.schedules import append_dims

Batch = dict[str, Any]
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # v(x_t, t) with t a [B] tensor


def _check_pair_batch(batch: Batch) -> tuple[Tensor, Tensor]:
    missing = [k for k in ("x", "z") if k not in batch]
    if missing:
        raise ValueError(f"reflow batch needs keys 'x' and 'z', missing {missing[0]!r} (got {sorted(batch)})")
    x, z = batch["x"], batch["z"]
    if x.shape != z.shape:
        raise ValueError(f"reflow batch: 'x' {tuple(x.shape)} and 'z' {tuple(z.shape)} must have the same shape")
    return x, z


def interpolate(x: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """The straight path x_t = (1 - t) x + t z (t a [B] tensor; data x at t = 0, noise z at t = 1)."""
    t = append_dims(t.to(x.dtype), x)
    return (1 - t) * x + t * z


class ReflowObjective:
    """Rectified-flow loss on a fixed coupling: ||v_hat(x_t, t) - (z - x)||^2, t ~ U(0, 1).

    Args:
        p_uncond: probability of replacing a label by the null label (keeps classifier-free guidance working).
        num_classes: number of classes (the null label's value); needed when p_uncond > 0.
    """

    name = "reflow"

    def __init__(self, p_uncond: float = 0.0, num_classes: Optional[int] = None) -> None:
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        if p_uncond > 0 and num_classes is None:
            raise ValueError("p_uncond > 0 needs num_classes (the null label), got num_classes=None")
        self.p_uncond, self.num_classes = float(p_uncond), num_classes

    def drop_labels(self, labels: Optional[Tensor]) -> Optional[Tensor]:
        if labels is None or self.p_uncond == 0.0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.p_uncond
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def __call__(self, model: Callable[..., Tensor], batch: Batch) -> tuple[Tensor, dict[str, float]]:
        x, z = _check_pair_batch(batch)
        cond = self.drop_labels(batch.get("y"))
        t = torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
        v_hat = model(interpolate(x, z, t), t, cond, target="v")
        loss = ((v_hat - (z - x)) ** 2).flatten(1).mean(1).mean()
        return loss, {"loss": float(loss.detach())}


class EulerDistillObjective:
    """Distil a (reflowed) coupling into `steps` Euler steps on the uniform grid from t = 1 to t = 0.

    x_hat = Euler(v_hat, z, steps) with gradients through every step; loss ||x_hat - x||^2 per element. The student
    stays a velocity model, so it samples with the ordinary Euler sampler at NFE `steps` (and still runs at other
    step counts, less accurately). steps = 1 is one-step distillation, x_hat = z - v_hat(z, 1).

    Why more than one step: measured on the default data (bench_reflow), one Euler step of the reflowed model had
    to undo the sharp parts of the teacher's map alone, while two distilled steps matched the teacher's best SW2.
    """

    name = "euler_distill"

    def __init__(self, steps: int = 1) -> None:
        if int(steps) < 1:
            raise ValueError(f"Euler distillation needs steps >= 1, got {steps}")
        self.steps = int(steps)

    def __call__(self, model: Callable[..., Tensor], batch: Batch) -> tuple[Tensor, dict[str, float]]:
        x, z = _check_pair_batch(batch)
        x_hat, cond = z, batch.get("y")
        for i in range(self.steps, 0, -1):  # t = i / steps -> (i - 1) / steps
            t = torch.full((x.shape[0],), i / self.steps, device=x.device, dtype=x.dtype)
            x_hat = x_hat - model(x_hat, t, cond, target="v") / self.steps
        loss = ((x_hat - x) ** 2).flatten(1).mean(1).mean()
        return loss, {"loss": float(loss.detach())}


@torch.no_grad()
def reflow_loss(velocity: VelocityFn, z: Tensor, x: Tensor, n_times: int = 16,
                generator: Optional[torch.Generator] = None) -> float:
    """Monte-Carlo reflow loss E_t E||v(x_t, t) - (z - x)||^2 of a velocity field on a coupling (z, x).

    Uses `n_times` stratified times in (0, 1) (one jittered time per stratum) for every pair; the squared norm is
    summed over dimensions (per-sample, not per-element, so it is on the same scale as `transport_cost`).
    """
    x, z = _check_pair_batch({"x": x, "z": z})
    if n_times < 1:
        raise ValueError(f"n_times must be >= 1, got {n_times}")
    jitter = torch.rand(n_times, generator=generator, dtype=torch.float64)
    times = ((torch.arange(n_times, dtype=torch.float64) + jitter) / n_times).tolist()
    total = 0.0
    for t in times:
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype)
        residual = velocity(interpolate(x, z, t_batch), t_batch) - (z - x)
        total += float((residual.to(torch.float64) ** 2).flatten(1).sum(1).mean())
    return total / n_times


def transport_cost(z: Tensor, x: Tensor) -> float:
    """Quadratic transport cost of the coupling, E||x - z||^2 (summed over dimensions, averaged over pairs)."""
    x, z = _check_pair_batch({"x": x, "z": z})
    return float(((x - z).to(torch.float64) ** 2).flatten(1).sum(1).mean())


def assignment_cost(z: Tensor, x: Tensor, max_pairs: int = 1024) -> float:
    """Empirical OT cost: the cheapest re-pairing of the two sample sets (exact assignment, squared distance).

    A lower bound reachable from the same marginal samples: a coupling whose cost is well above it is not
    optimal transport, whatever its reflow loss. Uses the first `max_pairs` pairs (O(n^3) assignment).
    """
    from scipy.optimize import linear_sum_assignment

    x, z = _check_pair_batch({"x": x, "z": z})
    n = min(len(x), max_pairs)
    a = z[:n].flatten(1).to(torch.float64)
    b = x[:n].flatten(1).to(torch.float64)
    cost = torch.cdist(a, b) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost.numpy()[rows, cols].mean())


def coupling_diagnostics(z: Tensor, x: Tensor, velocity: Optional[VelocityFn] = None, *, straight_tol: float = 1e-3,
                         max_pairs: int = 1024, generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """What can honestly be said about a coupling (z, x): reflow loss, transport cost, empirical OT cost.

    Returns {"reflow_loss" (None without `velocity`), "fixed_point" (reflow loss <= straight_tol x cost),
    "transport_cost", "assignment_cost", "cost_over_assignment", "optimal_transport": None, "note"}.
    "optimal_transport" is always None (unknown): neither a zero reflow loss nor straight paths imply OT
    (rotation counterexample); the cost ratio to the empirical OT cost is the evidence reported instead.
    """
    cost = transport_cost(z, x)
    ot = assignment_cost(z, x, max_pairs=max_pairs)
    loss = reflow_loss(velocity, z, x, generator=generator) if velocity is not None else None
    fixed_point = loss is not None and loss <= straight_tol * max(cost, 1e-12)
    ratio = cost / ot if ot > 0 else float("inf")
    note = (f"transport cost {cost:.4g} = {ratio:.3g}x the empirical OT cost {ot:.4g} of the same samples; "
            "a small reflow loss means straight, non-crossing paths (a fixed point of reflow), "
            "which does not imply optimal transport")
    return {"reflow_loss": loss, "fixed_point": bool(fixed_point), "transport_cost": cost,
            "assignment_cost": ot, "cost_over_assignment": ratio, "optimal_transport": None, "note": note}
