"""Consistency models: exact boundary, EDM view of a flow denoiser, Heun teacher step, zero loss of the exact
consistency function on Gaussian data, zero CM tangent (JVP), CT one-point target, sampler NFE."""
import math

import pytest
import torch

from components.diffusion import Denoiser, GaussianData, make_schedule
from components.diffusion.consistency import (ConsistencyFunction, edm_denoise, heun_edm_step, karras_sigmas,
                                              pseudo_huber)
from components.diffusion.samplers import sample, sampling_grid
from components.models import build_model
from components.objectives.consistency import ConsistencyObjective, ConsistencyPair

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def random_denoiser(schedule_name="flow") -> Denoiser:
    torch.manual_seed(0)
    net = build_model("mlp", data_dim=2, width=32, depth=2, embed_dim=16, dropout=0.0, num_classes=None).double()
    with torch.no_grad():  # output layer starts at zero: randomise all weights
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return Denoiser(net, make_schedule(schedule_name), sigma_data=0.6, prediction="v")


@pytest.mark.parametrize("schedule_name", ["flow", "edm", "vp_cosine"])
def test_boundary_is_exact_for_a_random_network(schedule_name):
    f = ConsistencyFunction(random_denoiser(schedule_name), SIGMA_MIN, SIGMA_MAX)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(32, 2, dtype=dtype) * 3
        out = f.to(dtype)(x, torch.full((32,), SIGMA_MIN, dtype=dtype))
        assert torch.equal(out, x)
        assert not torch.allclose(f(x, torch.full((32,), 1.0, dtype=dtype)), x)  # not the identity elsewhere


def test_edm_view_of_a_flow_denoiser_is_the_exact_reparametrisation():
    gauss = GaussianData(torch.tensor([1.0, -0.5]), 0.7)
    flow, edm = make_schedule("flow"), make_schedule("edm")
    x = torch.randn(16, 2, dtype=torch.float64)
    sigma = torch.linspace(0.01, 50, 16, dtype=torch.float64)
    via_flow = edm_denoise(gauss.denoiser(flow), flow, x, sigma)
    direct = gauss.denoiser(edm)(x, sigma)
    assert torch.allclose(via_flow, direct, atol=1e-10)


def test_karras_grid_and_multistep_sigmas():
    s = karras_sigmas(18, SIGMA_MIN, SIGMA_MAX, 7.0)
    assert s.shape == (18,) and math.isclose(float(s[0]), SIGMA_MIN) and math.isclose(float(s[-1]), SIGMA_MAX)
    i = torch.arange(18, dtype=torch.float64)
    closed = (SIGMA_MIN ** (1 / 7) + i / 17 * (SIGMA_MAX ** (1 / 7) - SIGMA_MIN ** (1 / 7))) ** 7
    assert torch.allclose(s, closed, rtol=1e-12)
    edm = make_schedule("edm", t_min=SIGMA_MIN, t_max=SIGMA_MAX)
    assert sampling_grid("consistency", "edm", edm, 1).tolist() == [SIGMA_MAX, 0.0]
    two = sampling_grid("consistency", "edm", edm, 2).tolist()
    assert two[0] == SIGMA_MAX and two[2] == 0.0
    assert math.isclose(two[1], ((SIGMA_MAX ** (1 / 7) + SIGMA_MIN ** (1 / 7)) / 2) ** 7)
    # logsnr: geometric in sigma, so the one intermediate level of 2 steps is sqrt(sigma_min sigma_max)
    assert math.isclose(sampling_grid("consistency", "logsnr", edm, 2).tolist()[1], math.sqrt(SIGMA_MIN * SIGMA_MAX))


def exact_consistency_function(gauss, edm):
    return lambda x, sigma, cond=None: gauss.flow_map(x, sigma, torch.full_like(sigma, SIGMA_MIN), edm)


def test_exact_consistency_function_has_zero_loss_and_heun_step_is_third_order():
    gauss, edm = GaussianData(torch.tensor([0.5, -1.0]), 0.4), make_schedule("edm", t_min=SIGMA_MIN, t_max=SIGMA_MAX)
    f_star = exact_consistency_function(gauss, edm)
    teacher = gauss.denoiser(edm)
    x0 = gauss.sample(512, torch.Generator().manual_seed(0))[0]
    eps = torch.randn_like(x0)
    sigmas = karras_sigmas(18, SIGMA_MIN, SIGMA_MAX)
    i = torch.randint(0, 17, (512,))
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x_next = x0 + sigma_next[:, None] * eps
    exact_step = gauss.flow_map(x_next, sigma_next, sigma, edm)
    loss = pseudo_huber(f_star(x_next, sigma_next), f_star(exact_step, sigma), c=1e-3)
    assert float(loss.max()) < 1e-9
    # The teacher's Heun step converges to the exact ODE map with local error O(h^3).
    errors = []
    for h in (0.2, 0.1, 0.05):
        s_from = torch.full((512,), 1.0, dtype=torch.float64)
        step = heun_edm_step(lambda x, s, c: teacher(x, s), x_next, s_from, s_from - h)
        errors.append(float((step - gauss.flow_map(x_next, s_from, s_from - h, edm)).abs().max()))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(2.6 < o < 3.4 for o in orders), (errors, orders)


def test_exact_consistency_function_has_zero_tangent_along_the_ode():
    """d/dsigma f*(x_sigma, sigma) = df/dsigma + (df/dx) . dx/dsigma = 0 along the PF-ODE (JVP plumbing)."""
    gauss, edm = GaussianData(torch.tensor([0.5, -1.0]), 0.4), make_schedule("edm", t_min=SIGMA_MIN, t_max=SIGMA_MAX)
    f_star = exact_consistency_function(gauss, edm)
    teacher = gauss.denoiser(edm)
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    sigma = torch.full((64,), 1.5, dtype=torch.float64)
    velocity = (x - teacher(x, sigma)) / sigma[:, None]  # EDM PF-ODE dx/dsigma
    _, tangent = torch.func.jvp(f_star, (x, sigma), (velocity, torch.ones_like(sigma)))
    assert float(tangent.abs().max()) < 1e-10
    _, wrong = torch.func.jvp(f_star, (x, sigma), (-velocity, torch.ones_like(sigma)))
    assert float(wrong.abs().max()) > 1e-3


def test_ct_target_is_the_one_point_estimate_and_ddim_with_score():
    objective = ConsistencyObjective(mode="train")
    x0, eps = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    s_next, s = torch.full((8,), 2.0, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64)
    x_next = x0 + 2.0 * eps
    out = objective.step_target_point(x0, eps, x_next, s_next, s, None)
    # DDIM (EDM: x_t = (t/s) x_s + (1 - t/s) x0_hat) with the one-point x0 = x_s - s * eps gives the same point.
    ddim = (0.5 / 2.0) * x_next + (1 - 0.5 / 2.0) * (x_next - 2.0 * eps)
    assert torch.allclose(out, x0 + 0.5 * eps, atol=1e-14) and torch.allclose(out, ddim, atol=1e-14)


def test_pseudo_huber_closed_form():
    a, b = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert torch.allclose(pseudo_huber(a, b, 1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(a, b, 0.0)


def test_ema_target_and_stopgrad():
    pair = ConsistencyPair(ConsistencyFunction(random_denoiser(), SIGMA_MIN, SIGMA_MAX))
    assert all(not p.requires_grad for p in pair.target.parameters())
    with torch.no_grad():
        for p in pair.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in pair.target.parameters()]
    pair.update_target(0.95)
    for b, t, s in zip(before, pair.target.parameters(), pair.student.parameters()):
        assert torch.allclose(t, 0.95 * b + 0.05 * s)
    pair.update_target(0.0)
    assert all(torch.equal(t, s) for t, s in zip(pair.target.parameters(), pair.student.parameters()))
    state = ConsistencyPair.student_state_dict(pair.state_dict())
    assert set(state) == set(pair.student.state_dict())


def test_objective_gradients_reach_only_the_student_and_bad_input():
    with pytest.raises(ValueError, match="needs a teacher"):
        ConsistencyObjective(mode="distill", teacher=None)
    with pytest.raises(ValueError, match="target"):
        ConsistencyObjective(mode="train", target="polyak")
    teacher = random_denoiser()
    pair = ConsistencyPair(ConsistencyFunction(random_denoiser(), SIGMA_MIN, SIGMA_MAX))
    objective = ConsistencyObjective(mode="distill", teacher=teacher, n_scales=10)
    loss, metrics = objective(pair, {"x": torch.randn(64, 2, dtype=torch.float64), "y": None})
    loss.backward()
    grads = [p.grad for p in pair.student.parameters()]
    assert loss.ndim == 0 and float(loss.detach()) > 0 and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in pair.target.parameters()) and all(p.grad is None for p in teacher.parameters())


def test_multistep_sampler_counts_nfe_and_one_step_is_f_of_noise():
    f = ConsistencyFunction(random_denoiser(), SIGMA_MIN, SIGMA_MAX).eval()
    noise = torch.randn(16, 2, dtype=torch.float64)
    with torch.no_grad():
        one = sample(f, f.schedule, "edm", noise, method="consistency", steps=1)
        assert one.nfe == 1 and torch.allclose(one.x, f(SIGMA_MAX * noise, torch.full((16,), SIGMA_MAX, dtype=torch.float64)))
        for steps in (2, 4):
            r = sample(f, f.schedule, "edm", noise, method="consistency", steps=steps,
                       generator=torch.Generator().manual_seed(0), return_trajectory=True)
            assert r.nfe == steps and len(r.trajectory) == steps + 1
