"""Training objectives (losses) following the Trainer's loss_fn(model, batch) -> (loss, metrics) contract."""

from components.objectives.denoising import OBJECTIVES, DenoisingObjective, make_objective

__all__ = ["OBJECTIVES", "DenoisingObjective", "make_objective"]
