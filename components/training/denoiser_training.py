"""Training recipe for denoisers (the teacher; students reuse the pieces): build the model spec from params and
the shard manifest, then run the one Trainer on the WebDataset loader.

`train_denoiser` runs the same way in a single process and on every rank of a multi-process launch (the loader
splits shards by rank; rank 0 exports the EMA weights).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from components.config import ModelParams, TeacherParams
from components.data.loader import epoch_batches, infinite_batches, make_loader
from components.errors import DataError
from components.models.store import build_denoiser
from components.objectives.denoising import make_objective
from components.training.distributed import world_info
from components.training.trainer import Trainer, TrainConfig, TrainResult

# Time grid that suits each objective's schedule (flow has infinite log-SNR at t = 1: uniform is the natural grid).
DEFAULT_GRID = {"edm": "edm", "eps": "logsnr", "flow": "uniform"}


def network_config(manifest: dict, model: ModelParams, num_classes: Optional[int]) -> dict[str, Any]:
    """{"kind", "kwargs"} for components.models.build_model, sized from the data's shape."""
    shape = list(manifest["shape"])
    kind = model.kind if model.kind != "auto" else ("unet" if manifest["kind"] == "image" else "mlp")
    if kind == "mlp":
        m = model.mlp
        return {"kind": "mlp", "kwargs": {"data_dim": math.prod(shape), "width": m.width, "depth": m.depth,
                                          "embed_dim": m.embed_dim, "dropout": m.dropout, "num_classes": num_classes}}
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DataError(f"model.kind unet needs square images [C, H, H]; the shards hold samples of shape {shape}")
    u = model.unet
    factor = 2 ** (len(u.channel_mult) - 1)
    if shape[1] % factor:
        raise DataError(f"image size {shape[1]}x{shape[2]} does not fit the UNet: model.unet.channel_mult "
                        f"{list(u.channel_mult)} halves the resolution {len(u.channel_mult) - 1} times, so the "
                        f"size must be a multiple of {factor}")
    return {"kind": "unet", "kwargs": {"image_size": shape[1], "in_channels": shape[0],
                                       "base_channels": u.base_channels, "channel_mult": list(u.channel_mult),
                                       "num_res_blocks": u.num_res_blocks,
                                       "attention_resolutions": list(u.attention_resolutions),
                                       "num_heads": u.num_heads, "dropout": u.dropout, "num_classes": num_classes}}


def teacher_spec(manifest: dict, model: ModelParams, teacher: TeacherParams) -> dict[str, Any]:
    """The model.json spec of the teacher (see components/models/store.py)."""
    if teacher.conditional and manifest.get("num_classes") is None:
        raise DataError("teacher.conditional is true but the shards have no class labels")
    num_classes = manifest["num_classes"] if teacher.conditional else None
    objective = make_objective(teacher.objective)  # only for its schedule and prediction type
    grid = teacher.sampler.grid if teacher.sampler.grid != "auto" else DEFAULT_GRID[teacher.objective]
    return {
        "network": network_config(manifest, model, num_classes),
        "schedule": {"name": objective.schedule_name, "kwargs": {}},
        "prediction": objective.prediction,
        "sigma_data": float(manifest["sigma_data"]),
        "data_shape": list(manifest["shape"]),
        "num_classes": num_classes,
        "kind": manifest["kind"],
        "objective": teacher.objective,
        "sampler": {"method": teacher.sampler.method, "grid": grid, "steps": teacher.sampler.steps,
                    "guidance": teacher.sampler.guidance},
    }


def objective_config(spec: dict[str, Any], teacher: TeacherParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"p_uncond": teacher.p_uncond if spec["num_classes"] is not None else 0.0,
                              "num_classes": spec["num_classes"]}
    if spec["objective"] == "edm":
        kwargs["sigma_data"] = spec["sigma_data"]
    return {"name": spec["objective"], "kwargs": kwargs}


def run_fingerprint(*parts: Any) -> str:
    """Short hash naming a checkpoint directory: same model, objective, data and optimiser -> same dir.

    `steps`, `checkpoint_every` and `log_every` are left out on purpose, so raising `steps` resumes training.
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.md5(blob).hexdigest()[:12]


def set_torch_threads(spec: dict[str, Any], requested: int = 0) -> int:
    """Intra-op threads for this process: `requested`, or for 0 one thread for MLPs (a small MLP step is
    dominated by thread synchronisation, which collapses when cores are shared) and all cores for UNets."""
    import os

    import torch

    threads = requested or (1 if spec["network"]["kind"] == "mlp" else max(1, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads


def train_denoiser(spec: dict[str, Any], objective: dict[str, Any], shard_dir: Path | str, train: dict[str, Any],
                   checkpoint_dir: Path | str, export_path: Path | str,
                   log_fn: Optional[Callable[[dict, int], None]] = None, progress: bool = True,
                   torch_threads: int = 0) -> tuple[TrainResult, int]:
    """Train a fresh denoiser from `spec` with `objective` on the shards; resume from `checkpoint_dir`; export the
    EMA weights (rank 0) to `export_path`. Called identically on every rank of a multi-process launch.

    Returns the Trainer's result and the step it resumed from (0 for a fresh start)."""
    set_torch_threads(spec, torch_threads)
    denoiser = build_denoiser(spec)
    loss_fn = make_objective(objective["name"], **objective["kwargs"])
    config = TrainConfig(**train, progress_bar=progress)
    _, world = world_info()
    if world > 1:  # exact epochs split by node and rank, the same number of batches on every rank
        batches = epoch_batches(shard_dir, "train", config.micro_batch_size(world), seed=config.seed)
    else:
        batches = infinite_batches(make_loader(shard_dir, "train", config.micro_batch_size(world), shuffle=True,
                                               seed=config.seed, drop_last=True))
    trainer = Trainer(denoiser, loss_fn, config, checkpoint_dir, log_fn=log_fn,
                      fingerprint={"spec": spec, "objective": objective})
    found = trainer.latest_checkpoint()
    resumed_from = int(found[1]["step"]) if found else 0
    if resumed_from and trainer.rank == 0:
        print(f"resuming from step {resumed_from} (checkpoint in {checkpoint_dir})", file=sys.stderr)
    result = trainer.fit(batches)
    trainer.export(export_path)
    return result, resumed_from
