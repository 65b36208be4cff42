"""`teacher` stage: train the teacher denoiser on data/shards with the one training recipe (DeepSpeed; in one
process, or on the ranks of the `distributed` section); write models/teacher/ (EMA weights, model.json, a sample
plot, manifest). Checkpoints live in checkpoints/teacher/<fingerprint>/ outside the DVC output, so a crashed or
interrupted run resumes where it stopped."""
from __future__ import annotations

import time

import torch
from prefect import flow

from components.data.shards import read_shard_manifest, read_split
from components.evaluation.plots import model_samples_plot
from components.models.store import WEIGHTS_FILE, load_denoiser, save_spec
from components.training.denoiser_training import denoiser_task, objective_config, teacher_spec
from components.training.recipe import checkpoint_dir, run_job, training_job
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="teacher", output="models/teacher", sections=("data", "model", "teacher"))


def train_teacher(ctx: StageContext) -> dict:
    shards = ctx.path("data/shards")
    manifest = read_shard_manifest(shards)
    p = ctx.params.teacher
    spec = teacher_spec(manifest, ctx.params.model, p)
    objective = objective_config(spec, p)
    root = ctx.use_checkpoint_dir(checkpoint_dir(ctx.path("checkpoints/teacher"), p.train_config(), spec, objective,
                                                 manifest["digest"]))
    started = time.time()
    job = training_job(denoiser_task, {"spec": spec, "objective": objective, "shards": str(shards)}, p,
                       p.train_config(), root, ctx.out_dir / WEIGHTS_FILE, ctx.run.run_id, ctx.run.tracking_uri,
                       ctx.params.distributed)
    outcome = run_job(job, log_fn=ctx.log_metrics)
    train_seconds = time.time() - started
    save_spec(ctx.out_dir, spec)
    real = None if manifest["kind"] == "image" else torch.from_numpy(read_split(shards, "val", limit=p.plot_samples)[0])
    ctx.run.log_artifact(model_samples_plot(load_denoiser(ctx.out_dir), ctx.out_dir / "samples.png", p.plot_samples,
                                            p.seed, real, name="teacher"))
    ctx.manifest.update({"model": spec, "objective": objective})
    return {"steps": outcome.steps, "final_loss": outcome.final_loss, "train_seconds": round(train_seconds, 2),
            "steps_per_sec": round((outcome.steps - outcome.resumed_from) / max(train_seconds, 1e-9), 2),
            "processes": ctx.params.distributed.world_size, "resumed_from_step": outcome.resumed_from}


@flow(name="teacher", description="Train the teacher diffusion model (DeepSpeed) on data/shards -> models/teacher/.")
def flow_fn():
    return run_stage_in_flow(SPEC, train_teacher)
