"""Closed-form oracles for the evaluation metrics (components/evaluation/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from components.evaluation.metrics import (
    DEFAULT_MMD_BANDWIDTHS,
    disjoint_subsets,
    fixed_directions,
    frechet_distance,
    frechet_distance_from_statistics,
    knn_precision_recall,
    mmd_rbf,
    path_length_ratio,
    ratio_to_floor,
    sliced_wasserstein2,
    straightness,
)


def _normal(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_matches_direct_scipy_formula():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_frechet_distance_zero_for_identical_sets():
    feats = _normal(100, 5, seed=0)
    assert frechet_distance(feats, feats.clone()) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_equal_covariance_grows_as_squared_mean_shift():
    feats = _normal(300, 4, seed=1)
    for scale in (0.5, 1.0, 3.0):
        shift = scale * torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
        # A translated copy has exactly the same sample covariance, so FD = ||shift||^2.
        assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-8)


def test_frechet_distance_from_statistics_diagonal_closed_form():
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])  # singular cov_b on purpose
    mean_a, mean_b = np.zeros(3), np.array([1.0, 0.0, 2.0])
    expected = 5.0 + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance_from_statistics(mean_a, np.diag(var_a), mean_b, np.diag(var_b)) == pytest.approx(expected)


def test_frechet_distance_rejects_too_few_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.ones((5, 3)))


# ------------------------------------------------------------------ sliced Wasserstein-2


def test_sw2_in_one_dimension_is_exact_w2_by_sorting():
    x, y = _normal(64, 1, seed=2), 2.0 * _normal(64, 1, seed=3) + 1.0
    expected = math.sqrt(float(((x.sort(0).values - y.sort(0).values) ** 2).mean()))
    assert sliced_wasserstein2(x, y, n_directions=16) == pytest.approx(expected, rel=1e-12)


def test_sw2_of_translated_set_matches_projected_shift():
    x = _normal(500, 3, seed=4)
    shift = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    directions = fixed_directions(3)
    # Translation preserves the sorted order along every direction: W2_theta = |theta . shift|.
    expected = math.sqrt(float((directions @ shift).pow(2).mean()))
    assert sliced_wasserstein2(x, x + shift) == pytest.approx(expected, rel=1e-10)
    # And the mean over uniform directions of (theta . s)^2 is ||s||^2 / D.
    assert expected == pytest.approx(math.sqrt(float(shift.pow(2).sum()) / 3), rel=0.05)


def test_sw2_unequal_counts_uses_exact_quantile_matching():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [0.5], [1.0]])
    # Quantile functions differ by 0.5 on u in (1/3, 2/3]: W2^2 = 0.25 * 1/3.
    assert sliced_wasserstein2(x, y, n_directions=4) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    duplicated = _normal(50, 2, seed=5)
    assert sliced_wasserstein2(duplicated, torch.cat([duplicated, duplicated])) == pytest.approx(0.0, abs=1e-12)


def test_sw2_and_mmd_near_floor_for_same_distribution_and_larger_when_shifted():
    real_a, real_b, model = _normal(800, 2, 6), _normal(800, 2, 7), _normal(800, 2, 8)
    shifted = model + torch.tensor([0.7, 0.0], dtype=torch.float64)
    sw_floor, mmd_floor = sliced_wasserstein2(real_a, real_b), mmd_rbf(real_a, real_b)
    assert ratio_to_floor(sliced_wasserstein2(model, real_b), sw_floor) < 2.5
    assert ratio_to_floor(mmd_rbf(model, real_b), mmd_floor) < 2.5
    assert ratio_to_floor(sliced_wasserstein2(shifted, real_b), sw_floor) > 4.0
    assert ratio_to_floor(mmd_rbf(shifted, real_b), mmd_floor) > 10.0


def test_sw2_deterministic_under_fixed_seed_and_seed_matters():
    x, y = _normal(200, 2, 9), _normal(200, 2, 10) * 1.5
    assert sliced_wasserstein2(x, y) == sliced_wasserstein2(x, y)
    assert sliced_wasserstein2(x, y, seed=0) != sliced_wasserstein2(x, y, seed=1)


def test_mmd_two_single_points_closed_form():
    a, b = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[0.3, 0.4]], dtype=torch.float64)
    expected = sum(2.0 * (1.0 - math.exp(-0.25 / (2 * h * h))) for h in DEFAULT_MMD_BANDWIDTHS)
    # Single points need the 1-sample minimum lifted: duplicate rows leave the V-statistic unchanged.
    assert mmd_rbf(a.repeat(2, 1), b.repeat(2, 1)) == pytest.approx(expected, rel=1e-12)
    assert mmd_rbf(a.repeat(2, 1), a.repeat(3, 1)) == pytest.approx(0.0, abs=1e-14)


def test_metrics_reject_dimension_mismatch_and_bad_bandwidths():
    with pytest.raises(ValueError, match="dimension mismatch"):
        sliced_wasserstein2(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_rbf(np.zeros((4, 2)), np.ones((4, 2)), bandwidths=(0.0,))


# ------------------------------------------------------------------ k-NN precision / recall


def test_knn_precision_recall_hand_example():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii are all 1
    fake = torch.tensor([[0.5], [10.0]])
    result = knn_precision_recall(real, fake, k=1)
    # 0.5 lies in the real balls, 10 does not; the two fake balls (radius 9.5) cover every real point.
    assert result == {"precision": 0.5, "recall": 1.0}


def test_knn_precision_recall_identical_is_one_and_collapse_drops_recall():
    real = _normal(400, 2, 11)
    assert knn_precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    same = knn_precision_recall(real, _normal(400, 2, 12))
    assert same["precision"] > 0.85 and same["recall"] > 0.85
    collapsed = knn_precision_recall(real, 0.05 * _normal(400, 2, 13))
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.2


def test_knn_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="at least 4 samples"):
        knn_precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# ------------------------------------------------------------------ straightness


def test_straightness_zero_for_straight_constant_speed_lines_on_uneven_grid():
    start, end = _normal(16, 2, 14), _normal(16, 2, 15)
    times = torch.tensor([1.0, 0.9, 0.6, 0.55, 0.2, 0.0])  # noise (t=1) to data (t=0)
    tau = (1.0 - times)[:, None, None]
    trajectory = [s for s in (start[None] + tau * (end - start)[None])]
    assert straightness(trajectory, times) == pytest.approx(0.0, abs=1e-12)
    assert path_length_ratio(trajectory) == pytest.approx(1.0, rel=1e-12)


def test_straightness_of_quarter_circle_matches_closed_form():
    radius = 2.0
    tau = torch.linspace(0, 1, 2001, dtype=torch.float64)
    angle = math.pi / 2 * tau
    path = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)[:, None, :]  # [K+1, B=1, 2]
    # S = R^2 * int_0^1 (2 - pi (sin + cos) + pi^2/4) dtau = R^2 (pi^2/4 - 2).
    expected = radius**2 * (math.pi**2 / 4 - 2)
    assert straightness(path, tau) == pytest.approx(expected, rel=1e-5)
    assert path_length_ratio(path) == pytest.approx(math.pi / (2 * math.sqrt(2)), rel=1e-5)


def test_straightness_straight_line_at_varying_speed():
    direction = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    tau = torch.linspace(0, 1, 4001, dtype=torch.float64)
    path = tau[:, None, None] ** 2 * direction[None]
    # v = 2 tau d, so S = |d|^2 int (1 - 2 tau)^2 = 25 / 3.
    assert straightness(path, tau) == pytest.approx(25 / 3, rel=1e-5)


def test_straightness_rejects_mismatched_times():
    with pytest.raises(ValueError, match="times"):
        straightness([torch.zeros(2, 2)] * 3, torch.tensor([1.0, 0.0]))


# ------------------------------------------------------------------ floors


def test_disjoint_subsets_and_ratio_to_floor():
    data = torch.arange(20).reshape(10, 2)
    a, b = disjoint_subsets(data, 5)
    assert set(a[:, 0].tolist()).isdisjoint(b[:, 0].tolist()) and len(a) == len(b) == 5
    with pytest.raises(ValueError, match="at least 12 rows"):
        disjoint_subsets(data, 6)
    assert ratio_to_floor(3.0, 1.5) == 2.0
    with pytest.raises(ValueError, match="floor"):
        ratio_to_floor(1.0, 0.0)


def test_straightness_of_exact_flow_sampler_trajectories_matches_closed_form():
    """Gaussian data N(mu, s^2 I) on the flow path (alpha = 1 - t, sigma = t) with the exact denoiser.

    With tau = 1 - t the PF-ODE path is x(tau) = tau mu + g(tau) z, g = sqrt(tau^2 s^2 + (1 - tau)^2),
    z the starting noise, so S = mean ||z||^2 * (int_0^1 g'^2 dtau - (s - 1)^2).
    """
    scipy_integrate = pytest.importorskip("scipy.integrate")
    from components.diffusion.grids import make_grid
    from components.diffusion.oracles import GaussianData
    from components.diffusion.samplers import sample
    from components.diffusion.schedules import make_schedule

    std = 0.3
    data = GaussianData(torch.tensor([1.0, -2.0], dtype=torch.float64), std)
    schedule = make_schedule("flow")
    noise = _normal(64, 2, seed=16)
    result = sample(data.denoiser(schedule), schedule, make_grid("uniform", schedule, 200), noise, method="heun",
                    return_trajectory=True)

    def g_prime(tau: float) -> float:
        return (tau * std**2 - (1 - tau)) / math.sqrt(tau**2 * std**2 + (1 - tau) ** 2)

    integral = scipy_integrate.quad(lambda tau: g_prime(tau) ** 2, 0.0, 1.0)[0]
    expected = float(noise.pow(2).sum(1).mean()) * (integral - (std - 1) ** 2)
    assert expected > 0.1
    assert straightness(result.trajectory, result.times) == pytest.approx(expected, rel=1e-3)
