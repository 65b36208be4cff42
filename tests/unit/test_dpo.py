"""Diffusion-DPO loss (components/objectives/dpo.py): the closed-form facts of reference section 9.5, plus the
held-out implicit accuracy and win-rate helpers."""
import copy
import math

import pytest
import torch
from torch import nn

from components.models.store import build_denoiser
from components.objectives.dpo import DiffusionDPOObjective, dpo_terms, regression_target, shared_noising
from components.preferences.alignment import label_matched_reference, win_rate
from components.preferences.finetune import time_sampler_for

SPEC = {"network": {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 32, "depth": 2, "embed_dim": 16}},
        "schedule": {"name": "flow", "kwargs": {}}, "prediction": "v", "sigma_data": 1.0, "data_shape": [2],
        "num_classes": None, "kind": "points", "objective": "flow"}


def _models(seed: int = 0, perturb: float = 0.0):
    torch.manual_seed(seed)
    reference = build_denoiser(SPEC)
    policy = copy.deepcopy(reference)
    if perturb:
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(perturb * torch.randn_like(p))
    return policy, reference


def _pairs(n: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) + 1.0


def test_loss_is_exactly_log2_and_accuracy_half_at_initialisation():
    policy, reference = _models()
    x_w, x_l = _pairs()
    objective = DiffusionDPOObjective(copy.deepcopy(reference), beta=500.0, time_sampler=time_sampler_for(SPEC),
                                      target="v")
    loss, metrics = objective(policy, {"x": x_w, "x_loser": x_l, "y": None})
    assert float(loss.detach()) == pytest.approx(math.log(2.0), abs=1e-7)
    assert metrics["implicit_accuracy"] == 0.5
    loss.backward()
    grad = sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None)
    assert grad > 0  # the loss is flat in value but not in slope: training moves away from the reference
    assert all(p.grad is None for p in objective.reference.parameters())  # the reference stays frozen


def test_swapping_winner_and_loser_flips_the_sign_of_the_inner_term():
    policy, reference = _models(perturb=0.05)
    x_w, x_l = _pairs()
    g = torch.Generator().manual_seed(3)
    t, eps = torch.rand(len(x_w), generator=g), torch.randn(x_w.shape, generator=g)
    forward = dpo_terms(policy, reference, reference.schedule, x_w, x_l, t, eps, None, 100.0, "v")
    swapped = dpo_terms(policy, reference, reference.schedule, x_l, x_w, t, eps, None, 100.0, "v")
    assert forward.inside.abs().min() > 0
    torch.testing.assert_close(swapped.inside, -forward.inside)
    # loss(-z) - loss(z) summed per pair: softplus(z) - softplus(-z) = z
    torch.testing.assert_close(nn.functional.softplus(forward.inside) - nn.functional.softplus(-forward.inside),
                               forward.inside)
    assert forward.implicit_accuracy + swapped.implicit_accuracy == pytest.approx(1.0)


def test_inner_term_matches_its_definition_from_the_four_errors():
    policy, reference = _models(perturb=0.05)
    x_w, x_l = _pairs(16)
    t, eps = torch.full((16,), 0.3), torch.randn(16, 2)
    terms = dpo_terms(policy, reference, reference.schedule, x_w, x_l, t, eps, None, 7.0, "v")
    # flow schedule: x_t = (1-t) x0 + t eps, v = eps - x0 (computed here by hand, not by the library)
    def mse(model, x0):
        v_hat = model((1 - 0.3) * x0 + 0.3 * eps, t, None, target="v")
        return ((v_hat - (eps - x0)) ** 2).mean(1)
    with torch.no_grad():
        expected = -7.0 * ((mse(policy, x_w) - mse(reference, x_w)) - (mse(policy, x_l) - mse(reference, x_l)))
    torch.testing.assert_close(terms.inside.detach(), expected)


class Recorder(nn.Module):
    """The real denoiser, remembering the inputs of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, cond=None, target="x0"):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.inner(x, t, cond, target=target)


def test_winner_and_loser_share_time_and_noise():
    policy, reference = _models()
    recorder = Recorder(policy)
    x_w, x_l = _pairs(32)
    objective = DiffusionDPOObjective(copy.deepcopy(reference), 10.0, time_sampler_for(SPEC), target="v")
    objective(recorder, {"x": x_w, "x_loser": x_l, "y": None})
    (x_t, t), = recorder.calls
    t_w, t_l = t[:32], t[32:]
    assert torch.equal(t_w, t_l) and t_w.unique().numel() > 1  # shared per pair, different across pairs
    alpha, sigma = (1 - t_w)[:, None], t_w[:, None]
    eps_w, eps_l = (x_t[:32] - alpha * x_w) / sigma, (x_t[32:] - alpha * x_l) / sigma
    torch.testing.assert_close(eps_w, eps_l, rtol=1e-4, atol=1e-4)


def test_shared_noising_and_targets_follow_the_schedule():
    _, reference = _models()
    x_w, x_l = _pairs(8)
    t, eps = torch.rand(8), torch.randn(8, 2)
    xt_w, xt_l = shared_noising(reference.schedule, x_w, x_l, t, eps)
    torch.testing.assert_close(xt_w - xt_l, (1 - t)[:, None] * (x_w - x_l))
    torch.testing.assert_close(regression_target("v", reference.schedule, x_w, eps, t), eps - x_w)


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_beta_must_be_positive(beta):
    _, reference = _models()
    with pytest.raises(ValueError, match="beta must be > 0"):
        DiffusionDPOObjective(reference, beta, time_sampler_for(SPEC))


def test_batch_without_losers_is_rejected():
    policy, reference = _models()
    objective = DiffusionDPOObjective(reference, 1.0, time_sampler_for(SPEC))
    with pytest.raises(ValueError, match="x_loser"):
        objective(policy, {"x": torch.zeros(4, 2)})


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 3.0, 0.0])) == pytest.approx(0.5)
    assert win_rate(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])) == 1.0


def test_label_matched_reference_copies_the_label_histogram():
    real_x = torch.tensor([[0.0, 0.0]] * 50 + [[10.0, 10.0]] * 50) + 0.01 * torch.randn(100, 2)
    real_y = torch.tensor([0] * 50 + [1] * 50)
    samples = torch.tensor([[0.1, 0.0]] * 30 + [[9.9, 10.0]] * 10)
    matched = label_matched_reference(samples, real_x, real_y)
    assert len(matched) == 40 and int((matched[:, 0] < 5).sum()) == 30
