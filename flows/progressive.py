"""`progressive` stage: progressive distillation of the teacher's DDIM sampler, teacher_steps -> ... -> 1 steps
(components/training/distillation.py). Every round is a child MLflow run of the stage run with its own checkpoint
dir (checkpoints/progressive/<fingerprint>/steps_<n>/), so a rerun after a crash fast-forwards the finished rounds
and resumes the interrupted one. Output models/progressive/: steps_<n>/ for every kept count, and at the top level
the 1-step student with spec["students"] = {"<n>": "steps_<n>"}.
"""
from __future__ import annotations


from prefect import flow

from components.data.shards import read_shard_manifest
from components.io import file_md5
from components.models.store import WEIGHTS_FILE
from components.training.distillation import load_plain_teacher, progressive_distillation
from components.training.recipe import checkpoint_dir, set_torch_threads
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="progressive", output="models/progressive", sections=("progressive",))


def distill(ctx: StageContext) -> dict:
    p = ctx.params.progressive
    shards = ctx.path("data/shards")
    teacher = load_plain_teacher(ctx.path("models/teacher"), "progressive")
    set_torch_threads(teacher.spec, p.torch_threads)
    root = ctx.use_checkpoint_dir(checkpoint_dir(
        ctx.path("checkpoints/progressive"), p.train_config(), teacher.spec, file_md5(teacher.directory / WEIGHTS_FILE),
        read_shard_manifest(shards)["digest"], p.teacher_steps, p.weighting))
    students, rounds = progressive_distillation(teacher, shards, p, root, ctx.out_dir, ctx.run.child_run,
                                                ctx.run.tracking_uri, ctx.params.distributed)
    ctx.manifest.update({"students": students, "teacher_steps": p.teacher_steps})
    ctx.record["round_run_ids"] = {k: r["mlflow_run_id"] for k, r in rounds.items()}
    return {"rounds": {k: {m: v for m, v in r.items() if m != "mlflow_run_id"} for k, r in rounds.items()}}


@flow(name="progressive", description="Progressive distillation of the teacher down to 1 step -> models/progressive/.")
def flow_fn():
    return run_stage_in_flow(SPEC, distill)
