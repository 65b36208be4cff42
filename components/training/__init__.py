"""The one Trainer (DeepSpeed engine), EMA of weights, checkpoint/resume and distributed helpers."""

from .distributed import ensure_process_group_env, launch_ranks, world_info
from .ema import EMA
from .trainer import (
    CheckpointMismatchError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainResult,
    build_deepspeed_config,
)

__all__ = [
    "EMA",
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_deepspeed_config",
    "ensure_process_group_env",
    "launch_ranks",
    "world_info",
]
