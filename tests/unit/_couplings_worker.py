"""One rank of the split couplings test: `python _couplings_worker.py MODEL_DIR WORK_DIR OUT` (run by launch_ranks).

Every rank solves its share of the chunks; rank 0 writes the merged (z, x) to OUT.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repository root, for `components`

from components.training.distributed import init_process_group, world_info  # noqa: E402
from components.models.store import load_denoiser  # noqa: E402
from components.training.reflow_training import generate_couplings  # noqa: E402


def main(model_dir: Path, work_dir: Path, out: Path) -> None:
    init_process_group()
    spec = json.loads((model_dir / "model.json").read_text())
    model = load_denoiser(model_dir)
    z, x, _, _ = generate_couplings(model, 10, 4, nfe=4, solver="heun", seed=7, work_dir=work_dir, progress=False)
    if world_info()[0] == 0:
        torch.save({"z": z, "x": x, "chunks": sorted(p.name for p in work_dir.glob("chunk*.pt"))}, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
