"""Denoiser training (the teacher): the model spec from params and the shard manifest, and the `denoiser` task of
the one training recipe (components/training/recipe.py) on the WebDataset loader, split by rank."""
from __future__ import annotations

import math
from typing import Any, Optional

from components.config import ModelParams, TeacherParams, TrainConfig
from components.data.loader import shard_batches
from components.errors import DataError
from components.models.store import build_denoiser
from components.objectives.denoising import make_objective
from components.training.recipe import TrainingTask, set_torch_threads

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


def denoiser_task(args: dict[str, Any], config: TrainConfig, world_size: int, threads: int = 0) -> TrainingTask:
    """A fresh denoiser from `args["spec"]` trained with `args["objective"]` on the shards `args["shards"]`."""
    spec, objective = args["spec"], args["objective"]
    set_torch_threads(spec, threads)
    denoiser = build_denoiser(spec)
    loss_fn = make_objective(objective["name"], **objective["kwargs"])
    return TrainingTask(denoiser, loss_fn, shard_batches(args["shards"], config, world_size),
                        fingerprint={"spec": spec, "objective": objective})
