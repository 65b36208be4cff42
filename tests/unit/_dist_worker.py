"""One rank of the multi-rank Trainer tests (run through launch_ranks): `python _dist_worker.py OUT CKPT STEPS ZERO`.

The data is one global batch stream, the same whatever the number of ranks: rank r of w trains on rows
[r*B/w, (r+1)*B/w) of each global batch of B. The loss is deterministic (no noise), so w ranks x B/w and one rank x B
compute the same averaged gradient up to float rounding. Rank 0 writes OUT/result.json (losses, final weights), or
OUT/error.txt with the one-line error when the checkpoint cannot be resumed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repository root, for `components`

from components.training import CheckpointMismatchError, TrainConfig, Trainer, world_info  # noqa: E402

GLOBAL_BATCH = 64


def main(out_dir: Path, checkpoint_dir: Path, steps: int, zero_stage: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    config = TrainConfig(steps=steps, batch_size=GLOBAL_BATCH, lr=3e-3, ema_decay=0.9, zero_stage=zero_stage,
                         checkpoint_every=50, log_every=10, seed=0, progress_bar=False)
    true_weights = torch.tensor([[1.0], [-2.0], [0.5], [0.25]])

    def loss_fn(engine, batch):
        return ((engine(batch["x"]) - torch.sin(batch["x"] @ true_weights)) ** 2).mean(), {}

    try:
        trainer = Trainer(model, loss_fn, config, checkpoint_dir)
    except CheckpointMismatchError as e:
        raise SystemExit(str(e))
    rank, world = world_info()
    share = GLOBAL_BATCH // world

    def batches():
        generator = torch.Generator().manual_seed(1)
        while True:
            x = torch.randn(GLOBAL_BATCH, 4, generator=generator)
            yield {"x": x[rank * share:(rank + 1) * share]}

    try:
        result = trainer.fit(batches())
    except CheckpointMismatchError as e:
        if rank == 0:
            (out_dir / "error.txt").write_text(str(e))
        return
    if rank == 0:
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        (out_dir / "result.json").write_text(json.dumps({
            "world_size": world, "steps": result.steps, "losses": [h["loss"] for h in result.history],
            "params": params.double().tolist()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
