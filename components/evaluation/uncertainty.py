"""Metrics with 95% intervals for the evaluation protocol v2 (DESIGN.md, "Uncertainty").

Every value comes with an interval:
- sw2 and mmd: value +- 1.96 sd, with Var = N_n + S_m m / n: N_n the variance of the metric between real sets at
  the full size n (the floor draws' sd^2), S_m = max(V_m - N_m, 0) the extra variance of the model's chunks,
  V_m the variance over `CHUNKS` disjoint chunk pairs of m = n / CHUNKS (generated chunk k vs reference chunk k)
  and N_m the same for real chunks. Near the floor these distances are degenerate statistics whose sd falls like
  1/n (floor sd at 2k: 0.016, at 10k: 0.0035 on the checkerboard), away from it like 1/sqrt(n); scaling the
  whole chunk variance by m / n (plain subsampling) made near-floor intervals ~3x too wide. Without floors
  (N = 0) this is plain subsampling. A percentile bootstrap was tried first and covered the closed-form SW2 of
  two Gaussians in only 14 of 40 repeats: resampling cannot reproduce the variability of the extreme quantiles
  that dominate W2 between sets of different spread; independent chunks can.
- w2 (exact, POT): mean over `W2_SUBSETS` disjoint subset pairs of `W2_SUBSET_SIZE` points; interval mean +- t sd/sqrt(K).
- off_support: Wilson score interval of a binomial fraction.
- fd: basic (bias-corrected) bootstrap over both feature sets; kid: mean over disjoint subset pairs, t-interval.
- floors: mean of >= 10 disjoint real-vs-real draws at the same sample sizes as the scored sets, with their sd.
- ratios: value / floor mean; the ratio interval divides the value's interval by the floor mean's 95% interval
  (lo / (f + 1.96 se), hi / (f - 1.96 se)), so it carries both uncertainties.

All randomness (directions, random features, bootstrap indices, subsets) comes from fixed seeds.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from components.evaluation.metrics import fixed_directions, frechet_distance_from_statistics, w2_squared_sorted_1d

N_BOOT = 50                # bootstrap replicates of fd
CHUNKS = 10                # disjoint chunk pairs whose spread gives the sd of sw2 and mmd
SW2_DIRECTIONS = 256       # protocol v2: fixed directions of sw2 (2-D: 0.7 degree spacing on average)
RFF_PER_BANDWIDTH = 256    # random Fourier features per RBF bandwidth of mmd
MMD_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)
W2_SUBSETS = 4
W2_SUBSET_SIZE = 500
KID_SUBSETS = 10
Z95 = 1.959963984540054
BOOT_SEED = 12345


@dataclass
class Estimate:
    """A value with its 95% interval [lo, hi]."""

    value: float
    lo: float
    hi: float

    def as_dict(self, name: str) -> dict[str, float | list[float]]:
        return {name: self.value, f"{name}_ci": [self.lo, self.hi]}


@dataclass
class Floor:
    """A metric between disjoint real sets: mean and sd over `draws` draws."""

    mean: float
    sd: float
    draws: int

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.draws)

    def ratio(self, estimate: Estimate) -> Estimate:
        """estimate / floor with an interval that also carries the floor mean's uncertainty."""
        if not (self.mean > 0):
            raise ValueError(f"floor must be positive for a ratio, got {self.mean}")
        f_hi = self.mean + Z95 * self.se
        f_lo = max(self.mean - Z95 * self.se, self.mean * 1e-3)
        return Estimate(estimate.value / self.mean, estimate.lo / f_hi, estimate.hi / f_lo)

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "sd": self.sd, "draws": self.draws}


def t_quantile_975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def mean_interval(values: np.ndarray) -> Estimate:
    """Mean of independent values with the t 95% interval."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return Estimate(mean, mean, mean)
    half = t_quantile_975(values.size - 1) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return Estimate(mean, mean - half, mean + half)


def wilson_interval(successes: int, n: int) -> Estimate:
    """A binomial fraction with its Wilson score 95% interval."""
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half))


def _as_float64(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    x = x.detach().to("cpu", torch.float64)
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- 2-D sample sets


class PointSet:
    """A 2-D (or low-dim) sample set prepared once for every protocol metric: sorted projections on the fixed
    directions and random Fourier features of the mmd kernel. Reference sets are prepared once per stage."""

    def __init__(self, x, directions: torch.Tensor, rff: torch.Tensor, rff_phase: torch.Tensor) -> None:
        self.x = _as_float64(x)
        if not torch.isfinite(self.x).all():
            raise ValueError("samples contain NaN or infinite values")
        self.n = self.x.shape[0]
        self.proj = (self.x @ directions.T).T.contiguous()  # [D, n]
        self.sorted_proj = torch.sort(self.proj, dim=1).values
        self._rff, self._rff_phase = rff, rff_phase
        self._chunked: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @functools.cached_property
    def features(self) -> torch.Tensor:
        """Random Fourier features [n, F] of the mmd kernel: computed on first use (the sampler sweep scores sw2
        only), in place (one pass over [n, F] instead of three)."""
        scale = math.sqrt(2.0 / self._rff.shape[0] * len(MMD_BANDWIDTHS))
        return torch.addmm(self._rff_phase, self.x, self._rff.T).cos_().mul_(scale)

    @functools.cached_property
    def mean_features(self) -> torch.Tensor:
        return self.features.mean(0)

    def chunked(self, chunks: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted projections [D, chunks, m] and mean features [chunks, F] of the first `chunks` disjoint chunks of
        m rows (one sort call for all chunks); kept, since a reference set is scored against many times."""
        if (chunks, m) not in self._chunked:
            proj = self.proj[:, :chunks * m].contiguous().reshape(self.proj.shape[0], chunks, m)
            self._chunked[(chunks, m)] = (torch.sort(proj, dim=2).values,
                                          self.features[:chunks * m].reshape(chunks, m, -1).mean(1))
        return self._chunked[(chunks, m)]


class PointMetrics:
    """sw2, mmd, w2 (and off_support when a support test is given) with intervals, for sets of one dimension."""

    def __init__(self, dim: int, seed: int = 0, n_directions: int = SW2_DIRECTIONS) -> None:
        self.directions = fixed_directions(dim, n_directions, seed)
        # Null variances (real vs real) at the full size n and at the chunk size m, set by `floors`.
        self.null_var: dict[str, float] = {}
        self.null_chunk_var: dict[str, float] = {}
        g = torch.Generator().manual_seed(seed + 1)
        freqs = [torch.randn(RFF_PER_BANDWIDTH, dim, generator=g, dtype=torch.float64) / h for h in MMD_BANDWIDTHS]
        self.rff = torch.cat(freqs)
        self.rff_phase = torch.rand(self.rff.shape[0], generator=g, dtype=torch.float64) * 2 * math.pi

    def prepare(self, x) -> PointSet:
        return PointSet(x, self.directions, self.rff, self.rff_phase)

    @staticmethod
    def sw2_value(a: PointSet, b: PointSet) -> float:
        return float(w2_squared_sorted_1d(a.sorted_proj.T, b.sorted_proj.T).mean().sqrt())  # rows are directions

    @staticmethod
    def mmd_value(a: PointSet, b: PointSet) -> float:
        return float(((a.mean_features - b.mean_features) ** 2).sum())

    @staticmethod
    def w2_values(a: PointSet, b: PointSet, subsets: int = W2_SUBSETS, size: int = W2_SUBSET_SIZE) -> np.ndarray:
        """Exact W2 (POT earth mover's distance, squared Euclidean cost) on disjoint subset pairs (first rows)."""
        import ot

        m = min(size, a.n // subsets, b.n // subsets)
        values = []
        for k in range(subsets):
            xa = a.x[k * m:(k + 1) * m].numpy()
            xb = b.x[k * m:(k + 1) * m].numpy()
            weights = np.full(m, 1.0 / m)
            values.append(math.sqrt(max(float(ot.emd2(weights, weights, ot.dist(xa, xb), numItermax=10**7)), 0.0)))
        return np.asarray(values)

    def score(self, gen: PointSet, ref: PointSet) -> dict[str, Estimate]:
        """sw2, mmd and w2 of `gen` against `ref` with intervals."""
        return {**self.sw2_mmd(gen, ref), "w2": mean_interval(self.w2_values(gen, ref))}

    def sw2_mmd(self, gen: PointSet, ref: PointSet, chunks: int = CHUNKS) -> dict[str, Estimate]:
        """sw2 and mmd of `gen` against `ref`, intervals from disjoint chunk pairs."""
        values, chunk_values, m = self._with_chunks(gen, ref, chunks)
        n = min(gen.n, ref.n)
        out = {}
        for name in ("sw2", "mmd"):
            extra = max(float(np.var(chunk_values[name], ddof=1)) - self.null_chunk_var.get(name, 0.0), 0.0)
            sd = math.sqrt(self.null_var.get(name, 0.0) + extra * m / n)
            out[name] = Estimate(values[name], max(0.0, values[name] - Z95 * sd), values[name] + Z95 * sd)
        return out

    def _with_chunks(self, gen: PointSet, ref: PointSet, chunks: int):
        """Full-size sw2 and mmd, and their values on `chunks` disjoint chunk pairs of m rows."""
        m = min(gen.n, ref.n) // chunks
        (gen_sorted, gen_mean), (ref_sorted, ref_mean) = gen.chunked(chunks, m), ref.chunked(chunks, m)
        chunk_values = {"sw2": ((gen_sorted - ref_sorted) ** 2).mean(2).mean(0).sqrt().numpy(),
                        "mmd": ((gen_mean - ref_mean) ** 2).sum(1).numpy()}
        return {"sw2": self.sw2_value(gen, ref), "mmd": self.mmd_value(gen, ref)}, chunk_values, m

    def floors(self, real_sets: list[PointSet], ref: PointSet, chunks: int = CHUNKS) -> dict[str, Floor]:
        """Each metric between `ref` and every real set (disjoint from it): mean and sd over the draws. Also records
        the null variances at full and chunk size that `sw2_mmd` intervals use."""
        full: dict[str, list[float]] = {"sw2": [], "mmd": []}
        chunk_var: dict[str, list[float]] = {"sw2": [], "mmd": []}
        for real in real_sets:
            values, chunk_values, _ = self._with_chunks(real, ref, chunks)
            for name in full:
                full[name].append(values[name])
                chunk_var[name].append(float(np.var(chunk_values[name], ddof=1)))
        floors = {name: _floor(v) for name, v in full.items()}
        self.null_var = {name: floors[name].sd ** 2 for name in full}
        self.null_chunk_var = {name: float(np.mean(v)) for name, v in chunk_var.items()}
        floors["w2"] = _floor([float(self.w2_values(r, ref).mean()) for r in real_sets])
        return floors


def _percentile(value: float, replicates: np.ndarray) -> Estimate:
    lo, hi = np.quantile(replicates, [0.025, 0.975])
    return Estimate(float(value), float(min(lo, value)), float(max(hi, value)))


def _floor(values) -> Floor:
    values = np.asarray(values, dtype=np.float64)
    return Floor(float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0, int(values.size))


# --------------------------------------------------------------------------- support of labelled toy sets


def checkerboard_off_support(x: torch.Tensor) -> torch.Tensor:
    """True where a point lies outside the 8 filled squares of the 4x4 board on [-2, 2]^2 (sources.make_toy2d)."""
    shifted = x + 2.0
    col, row = torch.floor(shifted[:, 0]), torch.floor(shifted[:, 1])
    on_board = (col >= 0) & (col <= 3) & (row >= 0) & (row <= 3)
    filled = (torch.remainder(row, 2) == torch.remainder(col, 2))
    return ~(on_board & filled)


def eight_gaussians_off_support(x: torch.Tensor) -> torch.Tensor:
    """True farther than 4 std (0.6) from every mode (real data: e^-8 = 0.03% of points)."""
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return torch.cdist(x.to(torch.float64), centres).min(1).values > 0.6


OFF_SUPPORT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "checkerboard": checkerboard_off_support,
    "eight_gaussians": eight_gaussians_off_support,
}


def off_support_fraction(x, dataset: str) -> Optional[Estimate]:
    """Fraction of samples off the support of a labelled toy set (Wilson interval); None for other data."""
    test = OFF_SUPPORT.get(dataset)
    if test is None:
        return None
    points = _as_float64(x)
    return wilson_interval(int(test(points).sum()), points.shape[0])


# --------------------------------------------------------------------------- image features


def kid_values(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = KID_SUBSETS,
               seed: int = BOOT_SEED) -> np.ndarray:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / F + 1)^3 (KID, Binkowski et al. 2018) on
    `subsets` random subset pairs of min(1000, n / 2) rows each."""
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    dim = a.shape[1]
    m = min(1000, max(2, min(a.shape[0], b.shape[0]) // 2))  # random halves at small n, so subsets differ
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:m]]
        y = b[torch.randperm(b.shape[0], generator=g)[:m]]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        off = m * (m - 1)
        values.append(float((k_xx.sum() - k_xx.diagonal().sum()) / off + (k_yy.sum() - k_yy.diagonal().sum()) / off
                            - 2 * k_xy.mean()))
    return np.asarray(values)


def kid(feats_a, feats_b) -> Estimate:
    """KID (unbiased at small n) with the t-interval over subset pairs."""
    return mean_interval(kid_values(feats_a, feats_b))


def fd_with_interval(feats_gen, feats_ref, seed: int = BOOT_SEED, n_boot: int = N_BOOT) -> Estimate:
    """Squared Fréchet distance with a basic (reflected) bootstrap interval over both feature sets, which corrects
    for the bootstrap's own upward bias. When that bias exceeds the value (small n in many dimensions: resampling
    duplicates inflate the covariances), the interval starts at 0: the data cannot tell the sets apart."""
    a, b = _as_float64(feats_gen).numpy(), _as_float64(feats_ref).numpy()

    def fd(x: np.ndarray, y: np.ndarray) -> float:
        return frechet_distance_from_statistics(x.mean(0), np.atleast_2d(np.cov(x, rowvar=False)),
                                                y.mean(0), np.atleast_2d(np.cov(y, rowvar=False)))

    value = fd(a, b)
    if n_boot < 1:  # the value alone (floor draws, sweep selection)
        return Estimate(value, value, value)
    rng = np.random.default_rng(seed)
    replicates = np.array([fd(a[rng.integers(0, a.shape[0], a.shape[0])], b[rng.integers(0, b.shape[0], b.shape[0])])
                           for _ in range(n_boot)])
    lo, hi = np.quantile(replicates, [0.025, 0.975])
    return Estimate(value, max(0.0, min(2 * value - hi, value)), max(2 * value - lo, value))


def floor_from_values(values) -> Floor:
    """A Floor from per-draw values."""
    return _floor(values)


def below_floor(estimate: Estimate, floor: Floor) -> bool:
    """True when the value lies below the floor's spread (mean - 1.96 sd of real-vs-real draws at the same n): better
    than real data, which flags an artefact (e.g. a low-diversity generator under a small-n biased metric), never a
    win. The raw value is compared, like the floor draws (a bias-corrected interval would not be like for like)."""
    return estimate.value < floor.mean - Z95 * floor.sd


def intervals_overlap(a: list[float] | tuple[float, float], b: list[float] | tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]
