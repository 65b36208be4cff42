"""Denoising objectives: exact denoiser beats a perturbed one; a tiny net lowers its loss; label dropout."""

import pytest
import torch
from torch import nn

from components.diffusion.conversions import convert
from components.diffusion.denoiser import Denoiser
from components.diffusion.oracles import GaussianData
from components.objectives.denoising import OBJECTIVES, make_objective

MU = torch.tensor([1.0, -0.5])
STD = 0.5


def gaussian_batch(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return {"x": MU + STD * torch.randn(n, 2, generator=generator), "y": None}


def loss_with_seed(objective, model, batch, seed):
    torch.manual_seed(seed)  # the objective draws t and eps from torch's global RNG
    return objective(model, batch)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_exact_denoiser_has_lower_loss_than_a_perturbed_one(name):
    objective = make_objective(name)
    data = GaussianData(MU, STD)
    exact = data.denoiser(objective.schedule)

    def perturbed(x, t, cond=None, target="x0"):
        # Shift the clean-data estimate by a constant, then express it in the requested target.
        wrong_x0 = data.predict(x, t, objective.schedule, "x0") + 0.05
        return convert(wrong_x0, "x0", target, x, t, objective.schedule)

    batch = gaussian_batch(8192, seed=0)
    exact_loss, metrics = loss_with_seed(objective, exact, batch, seed=1)
    perturbed_loss, _ = loss_with_seed(objective, perturbed, batch, seed=1)
    assert metrics["loss"] == pytest.approx(float(exact_loss))
    assert float(exact_loss) < float(perturbed_loss)


@pytest.mark.parametrize("name", ["eps", "flow"])
def test_loss_of_a_zero_model_has_its_closed_form_expectation(name):
    """eps: E||0 - eps||^2 = 1; flow: E||0 - (eps - x0)||^2 = 1 + E[x0^2] (per dimension)."""
    objective = make_objective(name)

    def zero_model(x, t, cond=None, target="x0"):
        return torch.zeros_like(x)

    loss, _ = loss_with_seed(objective, zero_model, gaussian_batch(40000, seed=3), seed=4)
    second_moment = float((MU**2).mean() + STD**2)
    expected = {"eps": 1.0, "flow": 1.0 + second_moment}[name]
    assert float(loss) == pytest.approx(expected, rel=0.03)


def test_edm_loss_of_the_identity_model_has_its_closed_form_expectation():
    """D(x_t) = x_t has error t * eps, so the EDM loss is E[(sd^2 + t^2)/sd^2] = 1 + exp(2 P_mean + 2 P_std^2)/sd^2."""
    objective = make_objective("edm", sigma_data=0.5)

    def identity_model(x, t, cond=None, target="x0"):
        return x

    loss, _ = loss_with_seed(objective, identity_model, gaussian_batch(400000, seed=5), seed=6)
    expected = 1.0 + torch.exp(torch.tensor(2 * -1.2 + 2 * 1.2**2)).item() / 0.25
    assert float(loss) == pytest.approx(expected, rel=0.1)


class TinyNet(nn.Module):
    """Throwaway MLP net(x, c_noise, cond) for the training check (the real networks live elsewhere)."""

    def __init__(self, dim=2, width=32):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, c_noise, cond=None):
        return self.layers(torch.cat([x, c_noise[:, None]], dim=1))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_tiny_net_trained_briefly_moves_toward_the_exact_loss(name):
    torch.manual_seed(0)
    objective = make_objective(name)
    model = Denoiser(TinyNet(), objective.schedule, sigma_data=0.5, prediction=objective.prediction)
    exact = GaussianData(MU, STD).denoiser(objective.schedule)
    eval_batch = gaussian_batch(4096, seed=10)
    with torch.no_grad():
        before = float(loss_with_seed(objective, model, eval_batch, seed=11)[0])
        floor = float(loss_with_seed(objective, exact, eval_batch, seed=11)[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    for step in range(200):
        loss, _ = objective(model, gaussian_batch(128, seed=100 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_with_seed(objective, model, eval_batch, seed=11)[0])
    assert after < before
    assert after - floor < 0.25 * (before - floor), f"before {before:.4f}, after {after:.4f}, exact {floor:.4f}"


def test_label_dropout_rate_and_null_label():
    objective = make_objective("flow", p_uncond=0.25, num_classes=10)
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (40000,))
    dropped = objective.drop_labels(labels)
    is_null = dropped == 10
    assert float(is_null.double().mean()) == pytest.approx(0.25, abs=0.01)
    assert torch.equal(dropped[~is_null], labels[~is_null])
    seen = []

    def recording_model(x, t, cond=None, target="x0"):
        seen.append(cond)
        return torch.zeros_like(x)

    objective(recording_model, {"x": torch.zeros(4000, 2), "y": torch.zeros(4000, dtype=torch.long)})
    assert 0.2 < float((seen[0] == 10).double().mean()) < 0.3


def test_objective_properties_and_bad_input():
    assert (make_objective("edm").schedule_name, make_objective("edm").prediction) == ("edm", "edm")
    assert (make_objective("eps").schedule_name, make_objective("eps").prediction) == ("vp_cosine", "eps")
    assert (make_objective("flow").schedule_name, make_objective("flow").prediction) == ("flow", "v")
    with pytest.raises(ValueError, match="unknown objective 'score'"):
        make_objective("score")
    with pytest.raises(ValueError, match="num_classes"):
        make_objective("edm", p_uncond=0.1)
    with pytest.raises(ValueError, match="bad argument"):
        make_objective("flow", sigma_data=0.5)
    with pytest.raises(ValueError, match="needs key 'x'"):
        make_objective("flow")(lambda *a, **k: None, {"y": None})
