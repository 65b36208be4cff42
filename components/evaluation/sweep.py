"""NFE sweeps: evaluate one model at several step counts with fixed noise, timing each point.

Also builds the standard score functions of the protocol (2-D: SW2 + MMD; images: FD + precision/recall
+ class accuracy), each reporting values and ratios to the floor, so a flow only wires them together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from components.evaluation.featurizer import ReferenceClassifier, extract_features, predict_labels
from components.evaluation.metrics import (
    class_accuracy,
    frechet_distance,
    knn_precision_recall,
    mmd_rbf,
    ratio_to_floor,
    sliced_wasserstein2,
)

GenerateFn = Callable[[int, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, int]]
ScoreFn = Callable[[torch.Tensor], dict[str, float]]


def validate_nfe_grid(nfe_grid: Iterable[Any]) -> list[int]:
    """Return the grid as a list of ints; ValueError unless it is non-empty, of ints >= 1, without repeats."""
    grid = list(nfe_grid)
    if not grid:
        raise ValueError("nfe_grid: must contain at least one value")
    for value in grid:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"nfe_grid: every value must be an int >= 1, got {value!r}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"nfe_grid: values must be unique, got {grid}")
    return grid


def nfe_sweep(
    generate: GenerateFn,
    nfe_grid: Sequence[int],
    noise: torch.Tensor,
    cond: torch.Tensor | None,
    score_fn: ScoreFn,
) -> dict[str, dict[str, float]]:
    """Run ``generate(nfe, noise, cond) -> (samples, actual_nfe)`` for each requested NFE and score it.

    The same ``noise`` (and ``cond``) is used at every NFE, so points differ only by the step count.
    Returns {str(requested_nfe): {**score_fn(samples), "nfe_actual": actual_nfe, "sec_per_sample": s}},
    where sec_per_sample is the wall time of ``generate`` divided by the number of samples (scoring
    time excluded). Timing is the only non-deterministic number in the result.
    """
    grid = validate_nfe_grid(nfe_grid)
    n_samples = int(noise.shape[0])
    if n_samples < 1:
        raise ValueError("noise: needs at least 1 sample")
    results: dict[str, dict[str, float]] = {}
    for nfe in grid:
        start = time.perf_counter()
        with torch.no_grad():
            samples, actual_nfe = generate(nfe, noise, cond)
        elapsed = time.perf_counter() - start
        if samples.shape[0] != n_samples:
            raise ValueError(f"generate(nfe={nfe}) returned {samples.shape[0]} samples for {n_samples} noise rows")
        entry = {key: float(value) for key, value in score_fn(samples).items()}
        entry["nfe_actual"] = int(actual_nfe)
        entry["sec_per_sample"] = elapsed / n_samples
        results[str(nfe)] = entry
    return results


def floor_2d(real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
    """SW2 and MMD between two disjoint real sets (the protocol's 2-D floor)."""
    return {"sw2": sliced_wasserstein2(real_a, real_b), "mmd": mmd_rbf(real_a, real_b)}


def make_2d_score_fn(reference: torch.Tensor, floor: dict[str, float]) -> ScoreFn:
    """Score function for 2-D samples against held-out ``reference``: sw2, mmd and their floor ratios."""

    def score(samples: torch.Tensor) -> dict[str, float]:
        sw2 = sliced_wasserstein2(samples, reference)
        mmd = mmd_rbf(samples, reference)
        return {
            "sw2": sw2,
            "sw2_ratio": ratio_to_floor(sw2, floor["sw2"]),
            "mmd": mmd,
            "mmd_ratio": ratio_to_floor(mmd, floor["mmd"]),
        }

    return score


def floor_images(classifier: ReferenceClassifier, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
    """Fréchet distance between two disjoint real image sets in the reference feature space."""
    return {"fd": frechet_distance(extract_features(classifier, real_a), extract_features(classifier, real_b))}


def make_image_score_fn(
    classifier: ReferenceClassifier,
    reference_images: torch.Tensor,
    floor: dict[str, float],
    cond: torch.Tensor | None = None,
    k: int = 3,
) -> ScoreFn:
    """Score function for images: fd, fd_ratio, precision, recall and (with ``cond``) class_accuracy.

    ``cond`` holds the class labels the samples were generated for; entries equal to num_classes
    (the null label) are excluded from the accuracy.
    """
    reference_features = extract_features(classifier, reference_images)

    def score(samples: torch.Tensor) -> dict[str, float]:
        features = extract_features(classifier, samples)
        fd = frechet_distance(features, reference_features)
        scores = {"fd": fd, "fd_ratio": ratio_to_floor(fd, floor["fd"])}
        scores.update(knn_precision_recall(reference_features, features, k=k))
        if cond is not None:
            labelled = cond < classifier.config.num_classes
            if bool(labelled.any()):
                predicted = predict_labels(classifier, samples[labelled])
                scores["class_accuracy"] = class_accuracy(predicted, cond[labelled])
        return scores

    return score
