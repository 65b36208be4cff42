"""Diffusion-DPO fine-tuning: the `dpo` task of the one training recipe (components/training/recipe.py). A copy of
the reference model is trained against the frozen reference on the preference pairs; the EMA weights are exported
in the model-store format."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from components.config import TrainConfig
from components.errors import DataError
from components.io import write_json
from components.models.store import LoadedModel, load_denoiser
from components.objectives.denoising import make_objective
from components.objectives.dpo import DiffusionDPOObjective, default_mse_target
from components.preferences.alignment import DPO_INFO_FILE, heldout_implicit_accuracy
from components.preferences.bradley_terry import preference_batches
from components.preferences.pairs import PairSet, read_pair_shards
from components.training.recipe import TrainingTask, rank_seed, set_torch_threads


def time_sampler_for(spec: dict[str, Any]) -> Callable[[int, torch.device], torch.Tensor]:
    """The training-time distribution of the reference's own objective (e.g. U(0, 1) for flow)."""
    kwargs = {"sigma_data": spec["sigma_data"]} if spec.get("objective") == "edm" else {}
    return make_objective(spec.get("objective", "flow"), **kwargs).sample_times


def dpo_pairs(reference: LoadedModel, reference_rel: str, pair_dir: Path | str, holdout_fraction: float,
              seed: int) -> tuple[PairSet, PairSet, dict]:
    """(training pairs, held-out pairs, pairs manifest) of the pairs in `pair_dir`; DataError when their samples
    do not have the reference's data shape."""
    pairs, manifest = read_pair_shards(pair_dir)
    if list(pairs.x_w.shape[1:]) != list(reference.spec["data_shape"]):
        raise DataError(f"{pair_dir} holds samples of shape {list(pairs.x_w.shape[1:])}, but {reference_rel} "
                        f"models data of shape {reference.spec['data_shape']}")
    return (*pairs.split(holdout_fraction, seed), manifest)


def write_dpo_info(out_dir: Path, reference: LoadedModel, reference_rel: str, pair_dir: Path, pair_manifest: dict,
                   train_count: int, heldout: PairSet, beta: float, seed: int) -> float:
    """The tuned model's dpo.json (what evaluate's alignment block reads: beta, reference dir, reward, held-out
    implicit accuracy; a Bradley-Terry reward model is copied beside it). Returns the held-out implicit accuracy."""
    tuned = load_denoiser(out_dir)
    accuracy = heldout_implicit_accuracy(tuned.denoiser, reference.denoiser, heldout, beta,
                                         time_sampler_for(reference.spec),
                                         target=default_mse_target(reference.spec["prediction"]), seed=seed)
    reward = dict(pair_manifest["reward"])
    if reward.get("kind") == "bradley_terry":  # keep the learned reward with the model (evaluate scores with it)
        shutil.copytree(Path(pair_dir) / reward["path"], Path(out_dir) / reward["path"])
    write_json(Path(out_dir) / DPO_INFO_FILE, {
        "beta": beta, "reference": reference_rel, "reward": reward, "pairs_train": train_count,
        "pairs_heldout": len(heldout), "implicit_accuracy_heldout": accuracy})
    return accuracy


def dpo_task(args: dict[str, Any], config: TrainConfig, world_size: int, threads: int = 0) -> TrainingTask:
    """A copy of the reference model in `args["reference"]` fine-tuned with Diffusion-DPO (`args["beta"]`) against
    the frozen reference, on the training part of the pairs in `args["pairs"]` (split by `holdout_fraction`,
    `split_seed`)."""
    reference = load_denoiser(args["reference"])
    set_torch_threads(reference.spec, threads)
    pairs, _, _ = dpo_pairs(reference, args["reference"], args["pairs"], args["holdout_fraction"], args["split_seed"])
    if len(pairs) < config.batch_size:
        raise DataError(f"dpo.batch_size={config.batch_size} is more than the {len(pairs)} training pairs; "
                        "lower it or collect more pairs (preferences.groups x k)")
    policy = copy.deepcopy(reference.denoiser).train()
    for p in policy.parameters():
        p.requires_grad_(True)
    objective = DiffusionDPOObjective(copy.deepcopy(reference.denoiser), args["beta"], time_sampler_for(reference.spec),
                                      target=default_mse_target(reference.spec["prediction"]))
    batches = preference_batches(pairs.x_w.float(), pairs.x_l.float(), config.micro_batch_size(world_size),
                                 rank_seed(config.seed), pairs.cond)
    return TrainingTask(policy, objective, batches,
                        fingerprint={"dpo": {"beta": args["beta"], "pairs": len(pairs), "reference": reference.spec}})
