"""`consistency` stage: consistency distillation from the teacher (mode distill) or consistency training without
a teacher (mode train), with the one Trainer. The student is the teacher's network wrapped as a consistency
function in EDM coordinates with the exact sigma_min boundary (components/diffusion/consistency.py); in
distill mode it starts from the teacher's weights. Output models/consistency/ (model.pt + model.json with a
"consistency" section and sampler method "consistency": `LoadedModel.sample(noise, nfe=k)` runs k-step
multistep consistency sampling). Checkpoints: checkpoints/consistency/<fingerprint>/ (resumable)."""
from __future__ import annotations

import sys
import time

import torch
from prefect import flow

from components.data.loader import infinite_batches, make_loader
from components.data.shards import read_shard_manifest
from components.errors import DataError, UserError
from components.models.store import WEIGHTS_FILE, build_denoiser, load_denoiser, save_denoiser
from components.objectives.consistency import ConsistencyObjective, ConsistencyPair
from components.training.denoiser_training import run_fingerprint, set_torch_threads, teacher_spec
from components.training.trainer import CheckpointMismatchError, NonFiniteLossError, Trainer, TrainConfig
from flows.progressive import weights_digest
from flows.stage import StageContext, StageSpec, run_stage_in_flow

def stage_spec(mode: str) -> StageSpec:
    """Consistency training reads no teacher, so its inputs (and lineage) leave models/teacher out."""
    inputs = ("data/shards", "models/teacher") if mode == "distill" else ("data/shards",)
    sections = ("consistency",) if mode == "distill" else ("consistency", "model", "teacher")
    return StageSpec(name="consistency", output="models/consistency", inputs=inputs, sections=sections)


SPEC = stage_spec("distill")


def student_spec(base: dict, p) -> dict:
    return {**base, "consistency": {"sigma_min": p.sigma_min, "sigma_max": p.sigma_max, "mode": p.mode},
            "sampler": {"method": "consistency", "grid": "edm", "steps": p.sampler_steps, "guidance": 1.0}}


def distill(ctx: StageContext) -> dict:
    p = ctx.params.consistency
    shards = ctx.path("data/shards")
    manifest = read_shard_manifest(shards)
    teacher = None
    if p.mode == "distill":
        teacher = load_denoiser(ctx.path("models/teacher"))
        if teacher.spec.get("consistency") or teacher.spec.get("students"):
            raise DataError("models/teacher is not a plain denoiser; consistency distillation needs the teacher")
        base, origin = {k: v for k, v in teacher.spec.items() if k != "sampler"}, weights_digest(teacher.directory / WEIGHTS_FILE)
    else:
        base, origin = teacher_spec(manifest, ctx.params.model, ctx.params.teacher), "scratch"
    spec = student_spec(base, p)
    set_torch_threads(spec, p.torch_threads)
    student = build_denoiser(spec)
    if teacher is not None:
        student.denoiser.load_state_dict(teacher.denoiser.state_dict())
    objective_kwargs = {"mode": p.mode, "sigma_min": p.sigma_min, "sigma_max": p.sigma_max, "n_scales": p.n_scales,
                        "rho": p.rho, "target": p.target, "target_ema": p.target_ema, "huber_c": p.huber_c}
    objective = ConsistencyObjective(teacher=teacher.denoiser if teacher else None, **objective_kwargs)
    train = p.trainer_kwargs()
    resume_key = {k: v for k, v in train.items() if k not in ("steps", "checkpoint_every", "log_every")}
    checkpoint_dir = ctx.path(f"checkpoints/consistency/{run_fingerprint(spec, origin, manifest['digest'], resume_key, objective_kwargs)}")
    ctx.run.set_tags({"checkpoint_dir": checkpoint_dir.relative_to(ctx.repo)})
    config = TrainConfig(**train, progress_bar=True)
    loader = make_loader(shards, "train", config.micro_batch_size(1), shuffle=True, seed=config.seed, drop_last=True)
    started = time.time()
    try:
        trainer = Trainer(ConsistencyPair(student), objective, config, checkpoint_dir, log_fn=ctx.log_metrics,
                          fingerprint={"spec": spec, "objective": objective_kwargs, "origin": origin})
        found = trainer.latest_checkpoint()
        result = trainer.fit(infinite_batches(loader))
    except (CheckpointMismatchError, NonFiniteLossError) as e:
        raise UserError(str(e)) from None
    save_denoiser(ctx.out_dir, ConsistencyPair.student_state_dict(trainer.ema_state_dict()), spec)
    load_denoiser(ctx.out_dir)  # the exported student rebuilds from its own model.json
    ctx.manifest.update({"model": spec, "objective": objective_kwargs,
                         "checkpoint_dir": str(checkpoint_dir.relative_to(ctx.repo))})
    return {"steps": result.steps, "final_loss": result.final_loss, "train_seconds": round(time.time() - started, 2),
            "resumed_from_step": int(found[1]["step"]) if found else 0, "mode": p.mode}


@flow(name="consistency", description="Consistency distillation (or training) -> models/consistency/.")
def flow_fn():
    from components.config import load_params
    from flows.runtime import repo_root
    from prefect import get_run_logger
    from prefect.states import Failed

    try:
        params = load_params(repo_root() / "params.yaml")
    except UserError as e:
        get_run_logger().error(f"{type(e).__name__}: {e}")
        return Failed(message=str(e), data=e)
    return run_stage_in_flow(stage_spec(params.consistency.mode), distill)


if __name__ == "__main__":
    sys.exit(0 if flow_fn(return_state=True).is_completed() else 1)
