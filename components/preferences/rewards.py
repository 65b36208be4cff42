"""Reward models for preference pairs: a small registry chosen by a JSON-able spec (from params).

A reward is a callable `reward(x, cond) -> Tensor [N]` (higher is better) on model-range samples x [N, ...]
and optional labels cond [N]. Kinds:

  region         2-D: minus the distance to the nearest preferred box (0 inside). Boxes are given directly
                 (`boxes`: [[xmin, ymin, xmax, ymax], ...]) or as checkerboard squares (`squares`: labels 0..7 of
                 the toy2d checkerboard, whose labels name its 8 filled squares).
  function       a user function `module:function` with the same signature (imported at build time).
  classifier     images: log-probability of the target class under the reference classifier (models/featurizer):
                 `target_class`, or the sample's own condition when it is null.
  bradley_terry  a Bradley-Terry reward model trained from labelled pairs (components/preferences/bradley_terry.py).

Every reward is checked on use: it must return a finite float tensor of shape [N].
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from components.errors import DataError

RewardFn = Callable[[Tensor, Optional[Tensor]], Tensor]
REWARD_KINDS = ("region", "function", "classifier", "bradley_terry")
CHECKERBOARD_SQUARES = 8


class RewardError(DataError):
    """A reward spec that cannot be built, or a reward function that returns something unusable."""


def checkerboard_square_box(label: int) -> list[float]:
    """[xmin, ymin, xmax, ymax] of filled square `label` of the toy2d checkerboard (4x4 board on [-2, 2]^2).

    Mirrors components/data/sources.make_toy2d: label = (row // 2) * 4 + col with row = 2 (label // 4) + col % 2.
    """
    if not 0 <= label < CHECKERBOARD_SQUARES:
        raise RewardError(f"reward.squares: {label} is not a checkerboard square (0..{CHECKERBOARD_SQUARES - 1})")
    col = label % 4
    row = 2 * (label // 4) + col % 2
    return [col - 2.0, row - 2.0, col - 1.0, row - 1.0]


def region_reward(boxes: list[list[float]]) -> RewardFn:
    """Minus the Euclidean distance from each 2-D point to the nearest box (0 inside any box)."""
    if not boxes:
        raise RewardError("reward.region needs at least one box or square")
    for box in boxes:
        if len(box) != 4 or box[0] >= box[2] or box[1] >= box[3]:
            raise RewardError(f"reward.boxes: {box} is not [xmin, ymin, xmax, ymax] with xmin < xmax, ymin < ymax")
    table = torch.tensor(boxes, dtype=torch.float64)

    def reward(x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != 2:
            raise RewardError(f"the region reward scores 2-D points [N, 2], got samples of shape {tuple(x.shape)}")
        p = x.to(torch.float64)[:, None, :]  # [N, 1, 2]
        below = (table[None, :, :2] - p).clamp(min=0)  # how far left/under each box
        above = (p - table[None, :, 2:]).clamp(min=0)  # how far right/over each box
        distance = (below + above).norm(dim=2)  # [N, boxes]; 0 inside a box
        return -distance.min(dim=1).values.to(x.dtype)

    return reward


def import_function(ref: str) -> Callable[..., Any]:
    """Import `module:function` (the module must be importable from the working directory or sys.path)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward.function '{ref}' must look like module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        raise RewardError(f"reward.function '{ref}': cannot import module '{module_name}' "
                          f"({e.__class__.__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward.function '{ref}': module '{module_name}' has no function '{attr}'")
    return fn


def classifier_reward(classifier_dir: Path | str, target_class: Optional[int]) -> RewardFn:
    """Log-probability of `target_class` (or of each sample's condition) under the reference classifier."""
    from components.evaluation.featurizer import load_classifier

    try:
        classifier = load_classifier(classifier_dir)
    except FileNotFoundError as e:
        raise RewardError(f"reward.kind classifier needs the reference classifier: {e}") from None
    num_classes = classifier.config.num_classes
    if target_class is not None and not 0 <= target_class < num_classes:
        raise RewardError(f"reward.target_class={target_class} is not a class of the classifier (0..{num_classes - 1})")

    @torch.no_grad()
    def reward(x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        if target_class is not None:
            labels = torch.full((x.shape[0],), target_class, dtype=torch.long)
        elif cond is not None and bool((cond < num_classes).all()):
            labels = cond.long().cpu()
        else:
            raise RewardError("reward.kind classifier: set reward.target_class (the samples carry no class labels)")
        logp = torch.cat([torch.log_softmax(classifier(chunk.float()), dim=1) for chunk in x.split(512)])
        return logp.gather(1, labels[:, None]).squeeze(1).to(x.dtype)

    return reward


def make_reward(spec: dict[str, Any], *, classifier_dir: Optional[Path | str] = None,
                model_dir: Optional[Path | str] = None) -> RewardFn:
    """Build a reward from its spec ({"kind": ..., kind-specific keys}); the result is shape-checked on use.

    `classifier_dir` is the reference classifier (kind classifier); `model_dir` a Bradley-Terry model directory
    (kind bradley_terry; `spec["path"]` is used when not given).
    """
    kind = spec.get("kind")
    if kind == "region":
        boxes = [list(map(float, b)) for b in spec.get("boxes") or []]
        boxes += [checkerboard_square_box(int(s)) for s in spec.get("squares") or []]
        fn = region_reward(boxes)
    elif kind == "function":
        if not spec.get("function"):
            raise RewardError("reward.function must name a user function module:function for reward.kind function")
        fn = import_function(spec["function"])
    elif kind == "classifier":
        if classifier_dir is None:
            raise RewardError("reward.kind classifier needs the reference classifier directory (models/featurizer)")
        fn = classifier_reward(classifier_dir, spec.get("target_class"))
    elif kind == "bradley_terry":
        from components.preferences.bradley_terry import load_reward_model

        where = model_dir or spec.get("path")
        if not where:
            raise RewardError("reward.kind bradley_terry needs the trained reward model's directory (reward.path)")
        fn = load_reward_model(where).reward
    else:
        raise RewardError(f"reward.kind '{kind}' is unknown (choose from {', '.join(REWARD_KINDS)})")
    return checked_reward(fn, spec.get("function") or kind)


def checked_reward(fn: Callable[..., Any], name: str) -> RewardFn:
    """Wrap a reward so that a wrong return (not a tensor/array, wrong shape, non-finite) is one clear error."""

    def reward(x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        out = fn(x, cond)
        if not torch.is_tensor(out):
            try:
                out = torch.as_tensor(out)
            except Exception:
                raise RewardError(f"reward '{name}' returned {type(out).__name__}, not a tensor of shape "
                                  f"[{x.shape[0]}]") from None
        if tuple(out.shape) != (x.shape[0],):
            raise RewardError(f"reward '{name}' returned shape {tuple(out.shape)}; expected [{x.shape[0]}] "
                              "(one score per sample)")
        out = out.detach().to(torch.float64)
        if not bool(torch.isfinite(out).all()):
            raise RewardError(f"reward '{name}' returned non-finite scores")
        return out

    return reward
