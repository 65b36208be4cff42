"""Intervals of the evaluation protocol v2 against closed forms (components/evaluation/uncertainty.py)."""
from __future__ import annotations

import math

import numpy as np
import torch

from components.evaluation.uncertainty import (PointMetrics, below_floor, checkerboard_off_support, fd_with_interval,
                                               floor_from_values, kid, off_support_fraction, wilson_interval)
from components.evaluation.metrics import frechet_distance, frechet_distance_from_statistics


def _gauss(n: int, mean, std, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) * torch.tensor(std) + torch.tensor(mean)


def test_sw2_interval_covers_the_closed_form_in_about_95_percent_of_repeats():
    # N(m1, diag s1^2) vs N(m2, diag s2^2): along direction u the projections are 1-D Gaussians, so
    # SW2^2 = mean_u [(u.(m1 - m2))^2 + (|u s1| - |u s2|)^2] exactly, for the metric's own fixed directions.
    metrics = PointMetrics(2)
    m1, s1, m2, s2 = [0.0, 0.0], [1.0, 0.5], [0.3, -0.2], [0.8, 0.7]
    u = metrics.directions
    proj_sd = lambda s: (u**2 * torch.tensor(s, dtype=torch.float64) ** 2).sum(1).sqrt()  # noqa: E731
    truth = float(((u @ (torch.tensor(m1) - torch.tensor(m2)).double()) ** 2
                   + (proj_sd(s1) - proj_sd(s2)) ** 2).mean().sqrt())
    covered = 0
    repeats = 40
    for r in range(repeats):
        a = metrics.prepare(_gauss(1000, m1, s1, 2 * r))
        b = metrics.prepare(_gauss(1000, m2, s2, 2 * r + 1))
        est = metrics.sw2_mmd(a, b)["sw2"]
        covered += est.lo <= truth <= est.hi
    assert 0.85 * repeats <= covered <= repeats, f"sw2 interval covered the truth {covered}/{repeats} times"


def test_fd_interval_covers_the_closed_form():
    d = 3
    mean_b = np.array([0.5, 0.0, 0.0])
    std_b = np.array([1.0, 1.5, 0.7])
    truth = frechet_distance_from_statistics(np.zeros(d), np.eye(d), mean_b, np.diag(std_b**2))
    covered, repeats = 0, 40
    for r in range(repeats):
        a = _gauss(500, [0.0] * d, [1.0] * d, 100 + r)
        b = _gauss(500, mean_b.tolist(), std_b.tolist(), 200 + r)
        est = fd_with_interval(a, b, seed=r)
        covered += est.lo <= truth <= est.hi
    assert 0.85 * repeats <= covered <= repeats, f"fd interval covered the truth {covered}/{repeats} times"


def test_mmd_floor_mean_matches_its_closed_form():
    # Biased MMD^2 with the fixed random-feature kernel phi between two independent samples of size n from
    # N(0, s^2 I): E = (1/n) sum_j [E phi_j(x)^2 - (E phi_j(x))^2] * 2, with phi_j = c cos(w_j.x + b_j):
    # E cos(w.x + b) = exp(-s^2 |w|^2 / 2) cos b and E cos^2(w.x + b) = (1 + exp(-2 s^2 |w|^2) cos 2b) / 2.
    metrics = PointMetrics(2)
    n, s = 2000, 0.8
    w2 = (metrics.rff**2).sum(1)
    c2 = 2.0 / metrics.rff.shape[0] * 5
    e_phi = torch.exp(-(s**2) * w2 / 2) * torch.cos(metrics.rff_phase)
    e_phi2 = (1 + torch.exp(-2 * s**2 * w2) * torch.cos(2 * metrics.rff_phase)) / 2
    expected = float(2.0 / n * c2 * (e_phi2 - e_phi**2).sum())
    ref = metrics.prepare(_gauss(n, [0, 0], [s, s], 999))
    real = [metrics.prepare(_gauss(n, [0, 0], [s, s], k)) for k in range(12)]
    floor = floor_from_values([metrics.mmd_value(r, ref) for r in real])
    assert floor.draws == 12 and floor.sd > 0
    # mean of 12 draws within 3 standard errors of the closed form (the draws share `ref`, so use their sd)
    assert abs(floor.mean - expected) < 3 * floor.sd / math.sqrt(floor.draws) + 0.05 * expected, (floor, expected)


def test_half_variance_generator_is_flagged_below_the_fd_floor_at_small_n_and_not_by_kid():
    d, n = 64, 60  # measured: floor FD 35.8 +- 1.0 (sd), half-variance generator ~30-31
    ref = _gauss(n, [0.0] * d, [1.0] * d, 1)
    floor_fd = floor_from_values([frechet_distance(_gauss(n, [0.0] * d, [1.0] * d, 10 + k), ref) for k in range(10)])
    narrow = _gauss(n, [0.0] * d, [math.sqrt(0.5)] * d, 2)
    fd = fd_with_interval(narrow, ref)
    assert below_floor(fd, floor_fd), (fd, floor_fd)
    # KID is unbiased: its floor is ~0 and the narrow generator is clearly above it.
    floor_kid = floor_from_values([kid(_gauss(n, [0.0] * d, [1.0] * d, 30 + k), ref).value for k in range(10)])
    k = kid(narrow, ref)
    assert not below_floor(k, floor_kid)
    assert k.value > floor_kid.mean and k.hi > k.lo


def test_checkerboard_off_support_is_zero_on_real_data_and_counts_empty_squares():
    from components.data.sources import make_toy2d

    x, _, _ = make_toy2d("checkerboard", 5000, 0)
    assert not bool(checkerboard_off_support(torch.from_numpy(x).double()).any())
    # centres of the 8 empty squares and 2 points off the board
    empty = torch.tensor([[c + 0.5 - 2, r + 0.5 - 2] for r in range(4) for c in range(4) if (r % 2) != (c % 2)]
                         + [[2.5, 0.0], [0.0, -2.5]], dtype=torch.float64)
    assert bool(checkerboard_off_support(empty).all())
    est = off_support_fraction(torch.cat([torch.from_numpy(x[:90]).double(), empty]), "checkerboard")
    assert abs(est.value - 0.1) < 1e-12 and est.lo < 0.1 < est.hi
    assert off_support_fraction(empty, "moons") is None


def test_wilson_interval_matches_a_known_value():
    est = wilson_interval(10, 100)  # textbook: [0.0552, 0.1744]
    assert abs(est.lo - 0.0552) < 5e-4 and abs(est.hi - 0.1744) < 5e-4


def test_image_reference_scores_with_intervals_against_the_train_split_and_flags_below_floor():
    from components.evaluation.featurizer import ClassifierConfig, ReferenceClassifier
    from components.evaluation.protocol import image_reference

    torch.manual_seed(0)
    classifier = ReferenceClassifier(ClassifierConfig(in_channels=1, num_classes=10, width=8, feature_dim=16)).eval()
    g = torch.Generator().manual_seed(1)
    train, val = torch.randn(300, 1, 8, 8, generator=g), torch.randn(80, 1, 8, 8, generator=g)
    reference = image_reference("digits", classifier, train, val, None, log=lambda _: None)
    assert reference.n == 40 and reference.floors["fd"].draws == 10 and reference.floors["fd"].sd > 0
    cond = torch.arange(40) % 10
    entry = reference.score(torch.randn(40, 1, 8, 8, generator=g), cond)
    for key in ("fd", "fd_ratio", "kid", "precision", "recall", "class_accuracy"):
        lo, hi = entry[f"{key}_ci"]
        assert lo <= entry[key] <= hi, key
    assert entry["fd_below_floor"] is False
    collapsed = reference.score(torch.zeros(40, 1, 8, 8) + val.mean(0, keepdim=True), cond)  # no diversity at all
    assert collapsed["recall"] < entry["recall"]
