"""`consistency` stage: consistency distillation from the teacher (mode distill) or consistency training without a
teacher (mode train) with the one training recipe (components/training/distillation.py). Output
models/consistency/ (model.pt + model.json with a "consistency" section and sampler method "consistency":
`LoadedModel.sample(noise, nfe=k)` runs k-step multistep consistency sampling). Checkpoints:
checkpoints/consistency/<fingerprint>/ (resumable)."""
from __future__ import annotations

import time

from prefect import flow

from components.data.shards import read_shard_manifest
from components.io import file_md5
from components.models.store import WEIGHTS_FILE, load_denoiser, save_spec
from components.training.denoiser_training import teacher_spec
from components.training.distillation import (consistency_objective_settings, consistency_spec, consistency_task,
                                              load_plain_teacher)
from components.training.recipe import checkpoint_dir, run_job, training_job
from flows.stage import StageContext, StageSpec, run_stage_in_flow

def stage_spec(mode: str) -> StageSpec:
    """Consistency training reads no teacher, so its inputs (and lineage) leave models/teacher out."""
    inputs = ("data/shards", "models/teacher") if mode == "distill" else ("data/shards",)
    sections = ("consistency",) if mode == "distill" else ("consistency", "model", "teacher")
    return StageSpec(name="consistency", output="models/consistency", inputs=inputs, sections=sections)


SPEC = stage_spec("distill")


def distill(ctx: StageContext) -> dict:
    p = ctx.params.consistency
    shards = ctx.path("data/shards")
    manifest = read_shard_manifest(shards)
    if p.mode == "distill":
        teacher = load_plain_teacher(ctx.path("models/teacher"), "consistency distillation")
        base, origin = {k: v for k, v in teacher.spec.items() if k != "sampler"}, file_md5(teacher.directory / WEIGHTS_FILE)
    else:
        teacher, base, origin = None, teacher_spec(manifest, ctx.params.model, ctx.params.teacher), "scratch"
    spec, objective = consistency_spec(base, p), consistency_objective_settings(p)
    root = ctx.use_checkpoint_dir(checkpoint_dir(ctx.path("checkpoints/consistency"), p.train_config(), spec, origin,
                                                 manifest["digest"], objective))
    args = {"spec": spec, "teacher": str(teacher.directory) if teacher else None, "objective": objective,
            "origin": origin, "shards": str(shards)}
    started = time.time()
    outcome = run_job(training_job(consistency_task, args, p, p.train_config(), root, ctx.out_dir / WEIGHTS_FILE,
                                   ctx.run.run_id, ctx.run.tracking_uri, ctx.params.distributed), log_fn=ctx.log_metrics)
    save_spec(ctx.out_dir, spec)
    load_denoiser(ctx.out_dir)  # the exported student rebuilds from its own model.json
    ctx.manifest.update({"model": spec, "objective": objective})
    return {"steps": outcome.steps, "final_loss": outcome.final_loss, "train_seconds": round(time.time() - started, 2),
            "resumed_from_step": outcome.resumed_from, "mode": p.mode}


@flow(name="consistency", description="Consistency distillation (or training) -> models/consistency/.")
def flow_fn():
    return run_stage_in_flow(lambda repo, params: stage_spec(params.consistency.mode), distill)
