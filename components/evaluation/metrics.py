"""Sample-quality metrics for the fixed evaluation protocol (DESIGN.md, "Evaluation protocol").

All metrics are deterministic: the only randomness (the sliced-Wasserstein directions) comes from a
fixed seed, so numbers are comparable across commits. Computations run in float64 on CPU.

Conventions:
- ``sliced_wasserstein2`` returns SW_2 = sqrt(mean over directions of W_2^2 of the 1-D projections).
- ``mmd_rbf`` returns the *biased* (V-statistic) estimate of MMD^2 with a sum of RBF kernels. It is
  never negative, so its floor (two real sets) is strictly positive and ratios to the floor are defined.
- ``frechet_distance`` returns the squared Fréchet distance between Gaussian fits (the "FID" formula).
- ``straightness`` is S = int_0^1 E||(x_end - x_start) - dx/dtau||^2 dtau (reference/algorithms-training.md,
  section 4), with tau the normalised time of a trajectory that runs from noise to data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Fixed protocol constants: changing them changes every reported number.
PROTOCOL_SEED = 0
DEFAULT_N_DIRECTIONS = 1024
DEFAULT_MMD_BANDWIDTHS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)
# Rows per block when building pairwise-distance matrices, to bound memory for large sample sets.
_PAIRWISE_BLOCK = 2048

ArrayLike = torch.Tensor | np.ndarray | Sequence


def _as_float64_matrix(samples: ArrayLike, name: str, min_rows: int = 2) -> torch.Tensor:
    """Turn samples into a float64 CPU tensor [N, D] (extra dims flattened); check N >= min_rows."""
    tensor = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
    tensor = tensor.detach().to(device="cpu", dtype=torch.float64)
    if tensor.ndim == 1:
        tensor = tensor[:, None]
    if tensor.ndim == 0:
        raise ValueError(f"{name}: expected samples shaped [N, ...], got a scalar")
    tensor = tensor.reshape(tensor.shape[0], -1)
    if tensor.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} samples, got {tensor.shape[0]}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return tensor


def _check_same_dim(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimension mismatch: x has {x.shape[1]}, y has {y.shape[1]}")


# --------------------------------------------------------------------------- sliced Wasserstein-2


def fixed_directions(dim: int, n_directions: int = DEFAULT_N_DIRECTIONS, seed: int = PROTOCOL_SEED) -> torch.Tensor:
    """Unit directions [n_directions, dim], uniform on the sphere, drawn from a fixed seed (float64)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if n_directions < 1:
        raise ValueError(f"n_directions must be >= 1, got {n_directions}")
    generator = torch.Generator().manual_seed(int(seed))
    directions = torch.randn(n_directions, dim, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=1, keepdim=True)


def w2_squared_sorted_1d(x_sorted: torch.Tensor, y_sorted: torch.Tensor) -> torch.Tensor:
    """Exact W2^2 between 1-D empirical measures, column-wise; inputs sorted along dim 0.

    With equal counts this is the mean squared difference of order statistics. With unequal counts
    the two piecewise-constant quantile functions are compared on the union of their breakpoints
    (exact quantile matching, no interpolation).
    """
    n, m = x_sorted.shape[0], y_sorted.shape[0]
    if n == m:
        return ((x_sorted - y_sorted) ** 2).mean(dim=0)
    levels = torch.unique(
        torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
    )
    levels[-1] = 1.0
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), levels[:-1]])
    widths = levels - lower
    keep = widths > 0
    mid, widths = ((lower + levels) / 2)[keep], widths[keep]
    x_index = torch.clamp((mid * n).floor().long(), max=n - 1)
    y_index = torch.clamp((mid * m).floor().long(), max=m - 1)
    diff = x_sorted[x_index] - y_sorted[y_index]
    return (widths[:, None] * diff**2).sum(dim=0)


def sliced_wasserstein2(
    x: ArrayLike, y: ArrayLike, n_directions: int = DEFAULT_N_DIRECTIONS, seed: int = PROTOCOL_SEED
) -> float:
    """Sliced Wasserstein-2 distance between two sample sets [N, D] and [M, D].

    Projects both sets on ``n_directions`` fixed unit directions (seeded), computes the exact 1-D W2 per
    direction by sorting (quantile matching when N != M) and returns sqrt(mean_theta W2_theta^2).
    """
    x64 = _as_float64_matrix(x, "x")
    y64 = _as_float64_matrix(y, "y")
    _check_same_dim(x64, y64)
    directions = fixed_directions(x64.shape[1], n_directions, seed)
    x_proj = torch.sort(x64 @ directions.T, dim=0).values
    y_proj = torch.sort(y64 @ directions.T, dim=0).values
    return float(w2_squared_sorted_1d(x_proj, y_proj).mean().sqrt())


# --------------------------------------------------------------------------- MMD


def _rbf_kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float]) -> float:
    """Sum over all pairs (a_i, b_j) of sum_h exp(-||a_i - b_j||^2 / (2 h^2)), computed in row blocks."""
    total = 0.0
    for start in range(0, a.shape[0], _PAIRWISE_BLOCK):
        sq_dist = torch.cdist(a[start : start + _PAIRWISE_BLOCK], b).pow(2)
        for bandwidth in bandwidths:
            total += float(torch.exp(-sq_dist / (2.0 * bandwidth**2)).sum())
    return total


def mmd_rbf(x: ArrayLike, y: ArrayLike, bandwidths: Sequence[float] = DEFAULT_MMD_BANDWIDTHS) -> float:
    """Biased (V-statistic) estimate of MMD^2 with the kernel sum_h exp(-||a-b||^2 / (2 h^2)).

    MMD^2_b = mean k(x, x') + mean k(y, y') - 2 mean k(x, y), including diagonal terms, so it is >= 0.
    """
    x64 = _as_float64_matrix(x, "x")
    y64 = _as_float64_matrix(y, "y")
    _check_same_dim(x64, y64)
    if len(bandwidths) == 0 or any(not (h > 0) for h in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty sequence of positive numbers, got {tuple(bandwidths)}")
    n, m = x64.shape[0], y64.shape[0]
    k_xx = _rbf_kernel_sum(x64, x64, bandwidths) / (n * n)
    k_yy = _rbf_kernel_sum(y64, y64, bandwidths) / (m * m)
    k_xy = _rbf_kernel_sum(x64, y64, bandwidths) / (n * m)
    # Rounding can push an exact zero slightly negative.
    return max(k_xx + k_yy - 2.0 * k_xy, 0.0)


# --------------------------------------------------------------------------- Fréchet distance


def gaussian_statistics(features: ArrayLike, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (float64) of features [N, F]; needs N >= 2."""
    feats = _as_float64_matrix(features, name, min_rows=2).numpy()
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False, ddof=1))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance_from_statistics(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) in float64.

    Tr((S_a S_b)^{1/2}) is computed as sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2})): that matrix is symmetric
    PSD, so the result is real and stable even for singular covariances (no imaginary parts to drop).
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mean_a.size, mean_a.size):
        raise ValueError(
            f"statistics shapes disagree: means {mean_a.shape} / {mean_b.shape}, covariances {cov_a.shape} / {cov_b.shape}"
        )
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle_eigs = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)
    trace_sqrt = float(np.sqrt(middle_eigs).sum())
    mean_term = float(((mean_a - mean_b) ** 2).sum())
    value = mean_term + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * trace_sqrt
    return max(value, 0.0)


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Squared Fréchet distance between Gaussian fits of two feature sets [N, F], [M, F] (N, M >= 2).

    With N <= F the covariance is rank-deficient; the value is still defined but biased upwards,
    so compare numbers only at equal sample counts (the protocol fixes them).
    """
    mean_a, cov_a = gaussian_statistics(feats_a, "feats_a")
    mean_b, cov_b = gaussian_statistics(feats_b, "feats_b")
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"feature dimension mismatch: feats_a has {mean_a.size}, feats_b has {mean_b.size}")
    return frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)


# --------------------------------------------------------------------------- k-NN precision / recall


def _kth_neighbour_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point in the same set."""
    radii = []
    for start in range(0, points.shape[0], _PAIRWISE_BLOCK):
        dist = torch.cdist(points[start : start + _PAIRWISE_BLOCK], points)
        # k + 1 smallest includes the point itself at distance 0.
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _fraction_inside_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of queries lying within radius of at least one support point."""
    inside = []
    for start in range(0, queries.shape[0], _PAIRWISE_BLOCK):
        dist = torch.cdist(queries[start : start + _PAIRWISE_BLOCK], support)
        inside.append((dist <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def knn_precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifold estimates.

    precision: fraction of fake samples inside the real manifold (union of balls around real points,
    radius = distance to the k-th nearest real neighbour); recall: the same with roles swapped.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = _as_float64_matrix(real_feats, "real_feats", min_rows=k + 1)
    fake = _as_float64_matrix(fake_feats, "fake_feats", min_rows=k + 1)
    _check_same_dim(real, fake)
    precision = _fraction_inside_manifold(fake, real, _kth_neighbour_radii(real, k))
    recall = _fraction_inside_manifold(real, fake, _kth_neighbour_radii(fake, k))
    return {"precision": precision, "recall": recall}


def class_accuracy(predicted_labels: ArrayLike, target_labels: ArrayLike) -> float:
    """Fraction of predicted labels equal to the requested class labels."""
    predicted = torch.as_tensor(np.asarray(predicted_labels)).reshape(-1)
    target = torch.as_tensor(np.asarray(target_labels)).reshape(-1)
    if predicted.numel() != target.numel():
        raise ValueError(f"label count mismatch: {predicted.numel()} predicted vs {target.numel()} targets")
    if predicted.numel() == 0:
        raise ValueError("class_accuracy: needs at least 1 label, got 0")
    return float((predicted.long() == target.long()).double().mean())


# --------------------------------------------------------------------------- trajectories


def _stack_trajectory(trajectory: Sequence[torch.Tensor] | torch.Tensor, times: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a trajectory to [K+1, B, D] float64 and return it with normalised times tau in [0, 1]."""
    states = trajectory if isinstance(trajectory, torch.Tensor) else torch.stack([torch.as_tensor(s) for s in trajectory])
    states = states.detach().to("cpu", torch.float64)
    if states.ndim < 2 or states.shape[0] < 2:
        raise ValueError(f"trajectory: needs at least 2 states shaped [B, ...], got shape {tuple(states.shape)}")
    states = states.reshape(states.shape[0], states.shape[1], -1)
    time_values = torch.as_tensor(np.asarray(times, dtype=np.float64)).reshape(-1)
    if time_values.numel() != states.shape[0]:
        raise ValueError(f"times: expected {states.shape[0]} values (one per state), got {time_values.numel()}")
    span = time_values[-1] - time_values[0]
    if span == 0:
        raise ValueError("times: first and last time are equal; cannot normalise to [0, 1]")
    tau = (time_values - time_values[0]) / span
    if not bool((tau[1:] > tau[:-1]).all()):
        raise ValueError("times: must be strictly monotone")
    return states, tau


def straightness(trajectory: Sequence[torch.Tensor] | torch.Tensor, times: ArrayLike) -> float:
    """Straightness S = int_0^1 E||(x_1 - x_0) - dx/dtau||^2 dtau of sampling trajectories.

    ``trajectory``: states [K+1] x [B, ...] from noise (first) to data (last); ``times``: the K+1 sampler
    times. Time is normalised to tau = (t - t_first) / (t_last - t_first) in [0, 1]; dx/dtau is the finite
    difference on each grid interval, so S is exact for the piecewise-linear path through the states.
    The norm is summed over dimensions and averaged over the batch. S = 0 for straight constant-speed paths.
    On a coarse grid the polyline hides curvature between states, so S is underestimated: compare models
    on trajectories recorded with the same (fine) grid.
    """
    return float(straightness_per_path(trajectory, times).mean())


def straightness_per_path(trajectory: Sequence[torch.Tensor] | torch.Tensor, times: ArrayLike) -> torch.Tensor:
    """The straightness integral of each path [B] (``straightness`` is their mean)."""
    states, tau = _stack_trajectory(trajectory, times)
    dtau = (tau[1:] - tau[:-1])
    velocities = (states[1:] - states[:-1]) / dtau[:, None, None]
    displacement = states[-1] - states[0]
    deviation = ((displacement[None] - velocities) ** 2).sum(dim=2)  # [K, B]
    return (dtau[:, None] * deviation).sum(dim=0)


def path_length_ratio(trajectory: Sequence[torch.Tensor] | torch.Tensor) -> float:
    """Mean over samples of (polyline length of the path) / ||x_last - x_first||; 1 for straight paths."""
    states = trajectory if isinstance(trajectory, torch.Tensor) else torch.stack([torch.as_tensor(s) for s in trajectory])
    states = states.detach().to("cpu", torch.float64)
    if states.ndim < 2 or states.shape[0] < 2:
        raise ValueError(f"trajectory: needs at least 2 states shaped [B, ...], got shape {tuple(states.shape)}")
    states = states.reshape(states.shape[0], states.shape[1], -1)
    length = (states[1:] - states[:-1]).norm(dim=2).sum(dim=0)
    chord = (states[-1] - states[0]).norm(dim=1)
    if bool((chord == 0).any()):
        raise ValueError("trajectory: some paths end where they start; length ratio undefined")
    return float((length / chord).mean())


# --------------------------------------------------------------------------- floors and ratios


def disjoint_subsets(data: ArrayLike, n: int, seed: int = PROTOCOL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random subsets of ``n`` rows each (seeded), for measuring a metric's floor."""
    tensor = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if 2 * n > tensor.shape[0]:
        raise ValueError(f"disjoint_subsets: needs at least {2 * n} rows for two sets of {n}, got {tensor.shape[0]}")
    order = torch.randperm(tensor.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    return tensor[order[:n]], tensor[order[n : 2 * n]]


def ratio_to_floor(value: float, floor: float) -> float:
    """value / floor; the floor must be positive (1.0 means as good as real data)."""
    if not (math.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be a positive finite number, got {floor}")
    return float(value) / float(floor)
