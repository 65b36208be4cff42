"""Diffusion-DPO fine-tuning recipe: a copy of the reference model trained against the frozen reference on
preference pairs with the one Trainer; exports the EMA weights in the model-store format."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from components.models.store import LoadedModel
from components.objectives.denoising import make_objective
from components.objectives.dpo import DiffusionDPOObjective, default_mse_target
from components.preferences.bradley_terry import pair_batches
from components.preferences.pairs import PairSet
from components.training.trainer import Trainer, TrainConfig, TrainResult


def time_sampler_for(spec: dict[str, Any]) -> Callable[[int, torch.device], torch.Tensor]:
    """The training-time distribution of the reference's own objective (e.g. U(0, 1) for flow)."""
    kwargs = {"sigma_data": spec["sigma_data"]} if spec.get("objective") == "edm" else {}
    return make_objective(spec.get("objective", "flow"), **kwargs).sample_times


def fine_tune_dpo(reference: LoadedModel, pairs: PairSet, *, beta: float, train: dict[str, Any],
                  checkpoint_dir: Path | str, export_path: Path | str,
                  log_fn: Optional[Callable[[dict, int], None]] = None, progress: bool = True) -> TrainResult:
    """Fine-tune a copy of `reference.denoiser` with Diffusion-DPO on `pairs`; write the EMA weights to
    `export_path`. `train` holds TrainConfig keys (steps, batch_size = pairs per step, lr, ...)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got beta={beta}")
    if list(pairs.x_w.shape[1:]) != list(reference.spec["data_shape"]):
        raise ValueError(f"pairs hold samples of shape {list(pairs.x_w.shape[1:])}, the reference model's data "
                         f"shape is {reference.spec['data_shape']}")
    policy = copy.deepcopy(reference.denoiser).train()
    for p in policy.parameters():
        p.requires_grad_(True)
    frozen = copy.deepcopy(reference.denoiser)
    objective = DiffusionDPOObjective(frozen, beta, time_sampler_for(reference.spec),
                                      target=default_mse_target(reference.spec["prediction"]))
    config = TrainConfig(**train, progress_bar=progress)
    trainer = Trainer(policy, objective, config, checkpoint_dir, log_fn=log_fn,
                      fingerprint={"dpo": {"beta": beta, "pairs": len(pairs), "reference": reference.spec}})
    result = trainer.fit(pair_batches(pairs.x_w.float(), pairs.x_l.float(), config.batch_size, config.seed,
                                      pairs.cond))
    trainer.export(export_path)
    return result
