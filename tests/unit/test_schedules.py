"""Schedules: closed-form values, analytic derivatives, log-SNR inverse, finite ends, bad input."""

import math

import pytest
import torch

from components.diffusion.schedules import SCHEDULES, make_schedule

NAMES = sorted(SCHEDULES)


def interior_times(schedule, n=9):
    return torch.linspace(schedule.t_min, schedule.t_max, n + 2, dtype=torch.float64)[1:-1]


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_central_differences(name):
    schedule = make_schedule(name)
    t = interior_times(schedule)
    h = 1e-6 * schedule.t_max
    numeric_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    numeric_sigma = (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.dalpha(t), numeric_alpha, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(schedule.dsigma(t), numeric_sigma, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_log_snr_definition_and_inverse(name):
    schedule = make_schedule(name)
    t = interior_times(schedule)
    torch.testing.assert_close(schedule.log_snr(t), torch.log(schedule.alpha(t) / schedule.sigma(t)))
    assert bool(torch.all(schedule.log_snr(t)[1:] < schedule.log_snr(t)[:-1])), "log-SNR must decrease in t"
    torch.testing.assert_close(schedule.t_of_log_snr(schedule.log_snr(t)), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["vp_cosine", "vp_linear"])
def test_variance_preserving(name):
    schedule = make_schedule(name)
    t = torch.linspace(0.0, schedule.t_max, 50, dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones_like(t))
    assert float(schedule.alpha(schedule.t_max)) > 0


def test_closed_forms_of_each_schedule():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    edm, flow = make_schedule("edm"), make_schedule("flow")
    torch.testing.assert_close(edm.sigma(t), t)
    torch.testing.assert_close(edm.alpha(t), torch.ones_like(t))
    torch.testing.assert_close(flow.alpha(t), 1 - t)
    linear = make_schedule("vp_linear")  # alpha = exp(-(0.1 t + 19.9 t^2 / 2) / 2)
    torch.testing.assert_close(linear.alpha(t), torch.exp(-0.5 * (0.1 * t + 9.95 * t**2)))
    cosine = make_schedule("vp_cosine")  # alpha_bar = cos^2((t + s)/(1 + s) pi/2) / cos^2(s/(1 + s) pi/2)
    s = 0.008
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(cosine.alpha(t) ** 2, abar)
    assert edm.t_min == 0.002 and edm.t_max == 80.0 and flow.t_max == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_ends_give_no_nan(name):
    schedule = make_schedule(name)
    t = torch.tensor([0.0, schedule.t_max], dtype=torch.float64)
    for fn in (schedule.alpha, schedule.sigma, schedule.dalpha, schedule.dsigma, schedule.log_snr):
        assert not torch.isnan(fn(t)).any(), f"{name}.{fn.__name__} is NaN at an end"
    assert float(schedule.sigma(0.0)) == 0.0 and float(schedule.log_snr(0.0)) == math.inf
    assert float(schedule.t_of_log_snr(torch.tensor(math.inf, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)
    if name == "flow":
        assert float(schedule.log_snr(1.0)) == -math.inf


@pytest.mark.parametrize("name", NAMES)
def test_dtype_and_broadcasting_preserved(name):
    schedule = make_schedule(name)
    t32 = torch.full((3, 2), 0.5 * schedule.t_max, dtype=torch.float32)
    for fn in (schedule.alpha, schedule.sigma, schedule.dalpha, schedule.dsigma, schedule.log_snr):
        out = fn(t32)
        assert out.dtype == torch.float32 and out.shape == (3, 2)
    assert schedule.alpha(0.5 * schedule.t_max).dtype == torch.float64


def test_make_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown schedule 'vp'.*edm"):
        make_schedule("vp")
    with pytest.raises(ValueError, match="t_min"):
        make_schedule("edm", t_min=5.0, t_max=1.0)
    with pytest.raises(ValueError, match="bad argument"):
        make_schedule("flow", beta_min=0.1)
    assert make_schedule("vp_linear", beta_max=10.0).alpha(1.0) > make_schedule("vp_linear").alpha(1.0)
