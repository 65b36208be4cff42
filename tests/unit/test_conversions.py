"""Conversions and the preconditioned Denoiser, checked against the exact Gaussian-data posterior."""

import pytest
import torch
from torch import nn

from components.diffusion.conversions import TARGETS, convert
from components.diffusion.denoiser import PREDICTIONS, Denoiser, precondition
from components.diffusion.oracles import GaussianData
from components.diffusion.schedules import SCHEDULES, make_schedule

NAMES = sorted(SCHEDULES)
MU = torch.tensor([0.8, -0.4, 0.1], dtype=torch.float64)
STD = 0.6


def exact_targets(schedule, x, t):
    """Closed forms written out independently of the library: x*, eps*, score*, v* for N(MU, STD^2 I)."""
    alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    dalpha, dsigma = schedule.dalpha(t)[:, None], schedule.dsigma(t)[:, None]
    variance = alpha**2 * STD**2 + sigma**2
    x0 = MU + alpha * STD**2 * (x - alpha * MU) / variance
    eps = sigma * (x - alpha * MU) / variance
    return {"x0": x0, "eps": eps, "score": -(x - alpha * MU) / variance, "v": dalpha * x0 + dsigma * eps}


def noisy_points(schedule, n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    t = schedule.t_min + (0.98 * schedule.t_max - schedule.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)
    x0 = MU + STD * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    x = schedule.alpha(t)[:, None] * x0 + schedule.sigma(t)[:, None] * eps
    return x, t


@pytest.mark.parametrize("name", NAMES)
def test_every_conversion_pair_matches_the_exact_posterior(name):
    schedule = make_schedule(name)
    x, t = noisy_points(schedule)
    exact = exact_targets(schedule, x, t)
    for source in TARGETS:
        for target in TARGETS:
            converted = convert(exact[source], source, target, x, t, schedule)
            torch.testing.assert_close(converted, exact[target], rtol=1e-8, atol=1e-8, msg=f"{source}->{target}")


@pytest.mark.parametrize("name", NAMES)
def test_oracle_and_tweedie(name):
    schedule = make_schedule(name)
    x, t = noisy_points(schedule, seed=1)
    exact = exact_targets(schedule, x, t)
    data = GaussianData(MU, STD)
    for target in TARGETS:
        torch.testing.assert_close(data.predict(x, t, schedule, target), exact[target], rtol=1e-9, atol=1e-9)
    alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    torch.testing.assert_close(exact["x0"], (x + sigma**2 * exact["score"]) / alpha)


@pytest.mark.parametrize("name", NAMES)
def test_loss_weight_identity(name):
    """||s - s*||^2 = ||eps - eps*||^2 / sigma^2 = alpha^2/sigma^4 ||x - x*||^2 (monograph (6.3.6))."""
    schedule = make_schedule(name)
    x, t = noisy_points(schedule, seed=2)
    exact = exact_targets(schedule, x, t)
    x0_wrong = exact["x0"] + 0.1 * torch.randn_like(x)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x0_err = ((x0_wrong - exact["x0"]) ** 2).sum(1)
    eps_err = ((convert(x0_wrong, "x0", "eps", x, t, schedule) - exact["eps"]) ** 2).sum(1)
    score_err = ((convert(x0_wrong, "x0", "score", x, t, schedule) - exact["score"]) ** 2).sum(1)
    torch.testing.assert_close(score_err, eps_err / sigma**2)
    torch.testing.assert_close(score_err, alpha**2 / sigma**4 * x0_err)


def test_v_to_x0_is_finite_at_the_flow_ends():
    schedule = make_schedule("flow")
    x = torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(convert(v, "v", "x0", x, t, schedule), x - t[:, None] * v)


def test_unknown_kind_is_rejected():
    schedule = make_schedule("edm")
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="unknown prediction kind 'noise'"):
        convert(x, "noise", "x0", x, 1.0, schedule)


class OracleNet(nn.Module):
    """Recovers (x, t) from its preconditioned inputs and returns the exact target for `prediction`.

    It inverts c_in and c_noise itself, so the test exercises the wrapper's input scaling and noise map.
    """

    def __init__(self, schedule, sigma_data, prediction):
        super().__init__()
        self.schedule, self.sigma_data, self.prediction = schedule, sigma_data, prediction

    def forward(self, scaled_x, c_noise, cond=None):
        t = self.schedule.t_of_log_snr(-4.0 * c_noise)
        c_skip, c_out, c_in, _ = precondition(self.schedule, t, self.sigma_data)
        x = scaled_x / c_in[:, None]
        exact = exact_targets(self.schedule, x, t)
        if self.prediction == "edm":
            return (exact["x0"] - c_skip[:, None] * x) / c_out[:, None]
        return exact[self.prediction]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_denoiser_returns_exact_targets_through_preconditioning(name, prediction):
    schedule = make_schedule(name)
    sigma_data = 0.5
    denoiser = Denoiser(OracleNet(schedule, sigma_data, prediction), schedule, sigma_data, prediction)
    x, t = noisy_points(schedule, seed=3)
    exact = exact_targets(schedule, x, t)
    for target in ("x0", "eps", "v"):
        torch.testing.assert_close(denoiser(x, t, target=target), exact[target], rtol=1e-7, atol=1e-7)
    raw = denoiser(x, t, target="raw")
    if prediction != "edm":
        assert torch.equal(denoiser(x, t, target=prediction), raw), "same-kind target must be the raw output"
    # A python-float time is broadcast over the batch.
    torch.testing.assert_close(denoiser(x, float(t[0]))[0], denoiser(x, t)[0])


def test_edm_preconditioning_limits_and_unit_variance():
    schedule = make_schedule("edm")
    sd = 0.5
    c_skip, c_out, c_in, c_noise = precondition(schedule, torch.tensor([1e-6, 1e4], dtype=torch.float64), sd)
    assert float(c_skip[0]) == pytest.approx(1.0, abs=1e-10) and float(c_out[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(c_out[1]) == pytest.approx(sd, rel=1e-6) and float(c_skip[1]) == pytest.approx(0.0, abs=1e-8)
    t = torch.tensor([0.3, 2.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = precondition(schedule, t, sd)
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sd**2 + t**2))
    torch.testing.assert_close(c_noise, torch.log(t) / 4)  # EDM's ln(sigma)/4
    # Var(target F) = 1 for data of std sd: (c_skip^2 (sd^2 + t^2) - 2 c_skip sd^2 + sd^2) / c_out^2.
    target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * t**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(t))


def test_denoiser_rejects_bad_arguments():
    schedule = make_schedule("edm")
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        Denoiser(nn.Identity(), schedule, 0.5, "score")
    denoiser = Denoiser(OracleNet(schedule, 0.5, "x0"), schedule, 0.5, "x0")
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown target 'score'"):
        denoiser(x, 1.0, target="score")
    with pytest.raises(ValueError, match="t must be"):
        denoiser(x, torch.ones(3, dtype=torch.float64))
