"""One rank of the 2-process Trainer test (run by launch_ranks): trains, then writes its weight checksums.

Usage: python _ddp_worker.py OUT_DIR. Each rank sees different data, so identical final weights on both
ranks show that gradients were averaged across ranks (not just that they started equal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repository root, for `components`

from components.training import TrainConfig, Trainer, world_info  # noqa: E402


def main(out_dir: Path) -> None:
    rank, world_size = world_info()
    torch.manual_seed(100 + rank)  # different initial weights per rank: DeepSpeed must broadcast rank 0's
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    true_weights = torch.tensor([[1.0], [-2.0], [0.5]])
    config = TrainConfig(steps=30, batch_size=16, lr=1e-2, grad_accum=2, ema_decay=0.9,
                         checkpoint_every=15, log_every=10, seed=3, progress_bar=False)
    micro = config.micro_batch_size(world_size)
    generator = torch.Generator().manual_seed(rank)

    def batches():
        while True:
            x = torch.randn(micro, 3, generator=generator)
            yield {"x": x, "y": None, "target": x @ true_weights}

    def loss_fn(engine, batch):
        noise = 0.01 * torch.randn_like(batch["target"])  # rank-specific noise from the seeded RNG
        return ((engine(batch["x"]) - batch["target"] - noise) ** 2).mean(), {}

    trainer = Trainer(model, loss_fn, config, out_dir / "checkpoints")
    result = trainer.fit(batches())
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    ema = torch.cat([t.flatten() for t in trainer.ema_state_dict().values()])
    report = {
        "rank": rank,
        "world_size": world_size,
        "steps": result.steps,
        "first_loss": result.history[0]["loss"],
        "final_loss": result.final_loss,
        "params": params.double().tolist(),
        "ema": ema.double().tolist(),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
