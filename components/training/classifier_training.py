"""Reference classifier training (the featurizer stage): the `reference_classifier` task of the one training recipe
(components/training/recipe.py), cross-entropy on the train split's images and labels, read from the shards split
by rank like the teacher's."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.config import TrainConfig
from components.data.loader import shard_batches
from components.evaluation.featurizer import ClassifierConfig, ReferenceClassifier
from components.training.recipe import TrainingTask, set_torch_threads


def classifier_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the class logits against the labels, and the batch's accuracy as a metric."""
    logits = model(batch["x"])
    accuracy = (logits.detach().argmax(dim=1) == batch["y"]).float().mean()
    return F.cross_entropy(logits, batch["y"]), {"accuracy": float(accuracy)}


def reference_classifier_task(args: dict[str, Any], config: TrainConfig, world_size: int,
                              threads: int = 0) -> TrainingTask:
    """A fresh reference classifier (`args["classifier"]`: ClassifierConfig fields) trained on the labelled train
    split of the shards `args["shards"]`."""
    classifier = ClassifierConfig(**args["classifier"])
    set_torch_threads({"network": {"kind": "reference_classifier"}}, threads)  # a CNN: all cores by default
    return TrainingTask(ReferenceClassifier(classifier), classifier_loss,
                        shard_batches(args["shards"], config, world_size), fingerprint={"classifier": args["classifier"]})
