"""How well a preference-tuned model did: reward win rate over its reference on held-out seeds, mean rewards,
quality drift, and the implicit accuracy of Diffusion-DPO on held-out pairs.

Win rate: both models turn the SAME held-out noise into samples (a noise stream disjoint from the pairs' seeds);
the tuned model wins a seed when its sample scores higher, ties count half.
Quality drift (the target is < 1.2x: the reward must not be gained by leaving the data distribution):
  2-D:    `sw2_matched` ratio. The reward re-weights modes on purpose, so a plain SW2 against the whole held-out
          set would count that as drift. Instead each sample takes the label (checkerboard square, mode) of its
          nearest held-out point, and the reference set is drawn from the held-out points with the SAME label
          histogram; SW2 against it measures how far samples are from the data within the modes they occupy.
          The plain SW2 ratio is reported too.
  images: Fréchet distance in the reference classifier's feature space, ratio tuned / reference (plain).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from components.evaluation.metrics import sliced_wasserstein2
from components.evaluation.protocol import fixed_noise_and_labels
from components.objectives.dpo import dpo_terms
from components.preferences.pairs import PairSet

HELDOUT_SEED_OFFSET = 7919  # evaluation noise stream: torch.Generator seeded with seed + this offset
DPO_INFO_FILE = "dpo.json"  # in a DPO model dir: beta, reference model dir, reward spec, held-out implicit accuracy


def win_rate(reward_tuned: Tensor, reward_reference: Tensor) -> float:
    """Fraction of seeds where the tuned sample scores higher; exact ties count half."""
    if reward_tuned.shape != reward_reference.shape:
        raise ValueError(f"reward shapes differ: {tuple(reward_tuned.shape)} vs {tuple(reward_reference.shape)}")
    wins = (reward_tuned > reward_reference).double() + 0.5 * (reward_tuned == reward_reference).double()
    return float(wins.mean())


def label_matched_reference(samples: Tensor, real_x: Tensor, real_y: Tensor, seed: int = 0) -> Tensor:
    """Held-out points with the label histogram of `samples` (each sample labelled by its nearest real point).

    Draws without replacement within a label while the label has enough points, with replacement beyond that.
    """
    nearest = torch.cdist(samples.double(), real_x.double()).argmin(dim=1)
    labels = real_y[nearest]
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for label in labels.unique():
        pool = torch.nonzero(real_y == label).squeeze(1)
        need = int((labels == label).sum())
        if need <= len(pool):
            picked.append(pool[torch.randperm(len(pool), generator=gen)[:need]])
        else:
            picked.append(pool[torch.randint(len(pool), (need,), generator=gen)])
    return real_x[torch.cat(picked)]


def evaluate_alignment(reference, tuned, reward: Callable[[Tensor, Optional[Tensor]], Tensor], *, n: int, seed: int,
                       real_x: Tensor, real_y: Optional[Tensor] = None, nfe: Optional[int] = None,
                       feature_fn: Optional[Callable[[Tensor], float]] = None) -> dict[str, float | dict]:
    """The `dpo` block of metrics.json (without implicit accuracy): win rate, mean rewards, quality drift.

    `reference`, `tuned`: LoadedModels with the same data shape. `real_x`/`real_y`: held-out data and labels.
    `feature_fn(samples) -> distance to the held-out data` replaces SW2 for images (e.g. Fréchet distance in
    the reference classifier's feature space). `nfe` None samples with each model's default sampler.
    """
    if list(reference.spec["data_shape"]) != list(tuned.spec["data_shape"]):
        raise ValueError(f"reference data shape {reference.spec['data_shape']} != tuned {tuned.spec['data_shape']}")
    noise, cond = fixed_noise_and_labels(reference, n, seed + HELDOUT_SEED_OFFSET)
    x_ref = reference.sample(noise, nfe=nfe, cond=cond).x
    x_tuned = tuned.sample(noise, nfe=nfe, cond=cond).x
    r_ref, r_tuned = reward(x_ref, cond), reward(x_tuned, cond)
    block: dict[str, float | dict] = {
        "win_rate": win_rate(r_tuned, r_ref),
        "reward_mean": {"reference": float(r_ref.mean()), "dpo": float(r_tuned.mean())},
        "n_seeds": n,
    }
    if feature_fn is not None:
        d_ref, d_tuned = feature_fn(x_ref), feature_fn(x_tuned)
        block["quality"] = {"metric": "fd", "reference": d_ref, "dpo": d_tuned}
        block["quality_drift"] = d_tuned / max(d_ref, 1e-12)
        return block
    real_x = real_x.to(x_ref.dtype)
    plain_ref, plain_tuned = sliced_wasserstein2(x_ref, real_x), sliced_wasserstein2(x_tuned, real_x)
    block["quality"] = {"metric": "sw2_matched" if real_y is not None else "sw2",
                        "sw2_reference": plain_ref, "sw2_dpo": plain_tuned,
                        "sw2_ratio": plain_tuned / max(plain_ref, 1e-12)}
    if real_y is None:
        block["quality_drift"] = block["quality"]["sw2_ratio"]
        return block
    matched_ref = sliced_wasserstein2(x_ref, label_matched_reference(x_ref, real_x, real_y, seed))
    matched_tuned = sliced_wasserstein2(x_tuned, label_matched_reference(x_tuned, real_x, real_y, seed))
    block["quality"].update({"sw2_matched_reference": matched_ref, "sw2_matched_dpo": matched_tuned})
    block["quality_drift"] = matched_tuned / max(matched_ref, 1e-12)
    return block


@torch.no_grad()
def heldout_implicit_accuracy(policy, reference, pairs: PairSet, beta: float, time_sampler, *, target: str,
                              seed: int = 0, repeats: int = 4) -> float:
    """Implicit accuracy of Diffusion-DPO on pairs, averaged over `repeats` draws of shared (t, eps) per pair."""
    gen = torch.Generator().manual_seed(seed)
    schedule = reference.schedule
    accs = []
    for _ in range(repeats):
        with torch.random.fork_rng(devices=[]):  # the time sampler draws from the global RNG: leave it untouched
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            t = time_sampler(len(pairs), pairs.x_w.device).to(pairs.x_w.dtype)
        eps = torch.randn(pairs.x_w.shape, generator=gen)
        accs.append(dpo_terms(policy, reference, schedule, pairs.x_w, pairs.x_l, t, eps, pairs.cond, beta,
                              target).implicit_accuracy)
    return float(sum(accs) / len(accs))


def alignment_block(tuned, load_reference: Callable[[str], object], *, n: int, seed: int, real_x: Tensor,
                    real_y: Optional[Tensor] = None, classifier_dir: Optional[Path] = None,
                    feature_fn: Optional[Callable[[Tensor], float]] = None) -> dict:
    """The whole `dpo` block of metrics.json for a DPO model dir (LoadedModel `tuned`): reads its dpo.json, rebuilds
    the reward, loads the reference with `load_reference(rel_dir)`, and adds the held-out implicit accuracy."""
    from components.errors import DataError
    from components.preferences.rewards import make_reward

    info_path = Path(tuned.directory) / DPO_INFO_FILE
    if not info_path.is_file():
        raise DataError(f"{tuned.directory} has no {DPO_INFO_FILE}: not a model written by the dpo stage")
    info = json.loads(info_path.read_text())
    reward_spec = info["reward"]
    model_dir = Path(tuned.directory) / reward_spec["path"] if reward_spec.get("kind") == "bradley_terry" else None
    reward = make_reward(reward_spec, classifier_dir=classifier_dir, model_dir=model_dir)
    block = evaluate_alignment(load_reference(info["reference"]), tuned, reward, n=n, seed=seed, real_x=real_x,
                               real_y=real_y, feature_fn=feature_fn)
    block["implicit_accuracy"] = float(info["implicit_accuracy_heldout"])
    block["beta"] = float(info["beta"])
    block["reference"] = info["reference"]
    return block
