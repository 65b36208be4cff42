"""A Bradley-Terry reward model learned from labelled (winner, loser) pairs (monograph 8.5.2):

    L_RM = -E log sigmoid(r(x_w) - r(x_l)).

Only score differences are identified (r is shift-invariant). The model is a small MLP on the flattened sample,
trained with the project's one Trainer; saved as reward_model.pt + reward_model.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import TrainConfig
from components.data.memory import shuffled_batches
from components.errors import DataError
from components.models.store import load_weights

WEIGHTS = "reward_model.pt"
CONFIG = "reward_model.json"


class BradleyTerryReward(nn.Module):
    """r(x) = MLP(flatten(x)) -> scalar per sample."""

    def __init__(self, data_shape: list[int], width: int = 64, depth: int = 2) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        self.data_shape = list(data_shape)
        self.width, self.depth = width, depth
        dim = math.prod(data_shape)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(dim if i == 0 else width, width), nn.SiLU()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(1)

    @torch.no_grad()
    def reward(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The reward-function interface (cond is ignored: the model is unconditional)."""
        self.eval()
        return torch.cat([self(chunk.float()) for chunk in x.split(4096)])


def bradley_terry_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Trainer loss_fn: -log sigmoid(r(x_w) - r(x_l)); batch {"x": winners, "x_loser": losers}."""
    margin = model(batch["x"]) - model(batch["x_loser"])
    loss = F.softplus(-margin).mean()
    return loss, {"pair_accuracy": float((margin > 0).float().mean())}


def preference_batches(x_w: Tensor, x_l: Tensor, batch_size: int, seed: int,
                 cond: Optional[Tensor] = None) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled minibatches of pairs {"x": winners, "x_loser": losers, "y": labels or None}."""
    return shuffled_batches({"x": x_w, "x_loser": x_l, "y": cond}, batch_size, seed, what="preference pairs")


def train_reward_model(x_w: Tensor, x_l: Tensor, checkpoint_dir: Path | str, *, steps: int = 300,
                       batch_size: int = 128, lr: float = 3e-3, width: int = 64, depth: int = 2,
                       seed: int = 0, progress: bool = False) -> BradleyTerryReward:
    """Fit a Bradley-Terry reward model on (winner, loser) pairs with the one training recipe; returns its EMA
    weights (exported to `checkpoint_dir`/reward_model.pt)."""
    from components.training.recipe import TrainingTask, train

    if x_w.shape != x_l.shape or len(x_w) == 0:
        raise DataError(f"winners {tuple(x_w.shape)} and losers {tuple(x_l.shape)} must be non-empty and alike")
    torch.manual_seed(seed)
    model = BradleyTerryReward(list(x_w.shape[1:]), width, depth)
    batch_size = min(batch_size, len(x_w))
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=0, ema_decay=0.9, seed=seed,
                         log_every=max(1, steps), progress_bar=progress)
    task = TrainingTask(model, bradley_terry_loss, preference_batches(x_w, x_l, batch_size, seed),
                        fingerprint={"reward_model": {"width": width, "depth": depth, "pairs": len(x_w)}})
    export = Path(checkpoint_dir) / WEIGHTS
    train(task, config, checkpoint_dir, export)
    trained = BradleyTerryReward(list(x_w.shape[1:]), width, depth)
    trained.load_state_dict(load_weights(export))
    return trained.eval()


def save_reward_model(model: BradleyTerryReward, directory: Path | str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps({"data_shape": model.data_shape, "width": model.width,
                                                "depth": model.depth}, indent=2, sort_keys=True) + "\n")
    return directory


def load_reward_model(directory: Path | str) -> BradleyTerryReward:
    directory = Path(directory)
    missing = [f for f in (WEIGHTS, CONFIG) if not (directory / f).is_file()]
    if missing:
        raise DataError(f"{directory} is not a Bradley-Terry reward model: missing {', '.join(missing)}")
    config: dict[str, Any] = json.loads((directory / CONFIG).read_text())
    model = BradleyTerryReward(config["data_shape"], config["width"], config["depth"])
    model.load_state_dict(load_weights(directory / WEIGHTS))
    return model.eval()


def labelled_pairs_scored(path: Path | str, data_shape: list[int], num_classes: Optional[int], checkpoint_dir: Path,
                          reward_dir: Path, *, steps: int, seed: int):
    """Preference pairs from a labelled JSONL file, scored by a Bradley-Terry reward model fitted on them (saved to
    `reward_dir`, so evaluation scores with the same reward). Returns the PairSet."""
    from components.preferences.pairs import read_labelled_pairs

    pairs = read_labelled_pairs(path, data_shape, num_classes)
    reward_model = train_reward_model(pairs.x_w, pairs.x_l, checkpoint_dir, steps=steps, seed=seed)
    save_reward_model(reward_model, reward_dir)
    pairs.score_w, pairs.score_l = reward_model.reward(pairs.x_w).double(), reward_model.reward(pairs.x_l).double()
    return pairs
