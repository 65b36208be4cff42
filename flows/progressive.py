"""`progressive` stage: progressive distillation of the teacher's DDIM sampler, teacher_steps -> ... -> 1 steps.

Each round halves the step count: the student starts from the previous round's model and regresses the
closed-form x-target of two teacher DDIM steps (components/objectives/progressive.py). Every round is a child
MLflow run of the stage run with its own checkpoint dir (checkpoints/progressive/<fingerprint>/steps_<n>/), so
a rerun after a crash fast-forwards the finished rounds (their last checkpoint is the final step) and resumes
the interrupted one. Output models/progressive/: steps_<n>/ (model.pt + model.json) for every kept count, and
at the top level the 1-step student with spec["students"] = {"<n>": "steps_<n>"}, which
LoadedModel.sample(noise, nfe=k) uses to pick the student trained for k steps.
"""
from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path

import torch
from prefect import flow

from components.data.loader import infinite_batches, make_loader
from components.data.shards import read_shard_manifest
from components.diffusion.guidance import GuidedDenoiser
from components.errors import DataError, UserError
from components.models.store import WEIGHTS_FILE, build_denoiser, load_denoiser, save_denoiser
from components.objectives.progressive import ProgressiveObjective
from components.training.denoiser_training import run_fingerprint, set_torch_threads
from components.training.trainer import CheckpointMismatchError, NonFiniteLossError, Trainer, TrainConfig
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="progressive", output="models/progressive", sections=("progressive",))


def weights_digest(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()[:12]


def train_round(spec: dict, previous: torch.nn.Module, target, student_steps: int, shards: Path, train: dict,
                weighting: str, checkpoint_dir: Path, export: Path, log_fn) -> dict:
    """One halving round with the one Trainer: the student starts from `previous`'s weights and learns two DDIM
    steps of `target` (`previous` itself, or the guided teacher in round 1); exports its EMA weights to `export`."""
    student = build_denoiser(spec)
    student.load_state_dict(previous.state_dict())
    objective = ProgressiveObjective(copy.deepcopy(target), student.schedule, student_steps, weighting)
    config = TrainConfig(**train)
    loader = make_loader(shards, "train", config.micro_batch_size(1), shuffle=True, seed=config.seed, drop_last=True)
    trainer = Trainer(student, objective, config, checkpoint_dir, log_fn=log_fn,
                      fingerprint={"spec": spec, "student_steps": student_steps, "weighting": weighting})
    found = trainer.latest_checkpoint()
    result = trainer.fit(infinite_batches(loader))
    trainer.export(export)
    return {"steps": result.steps, "final_loss": result.final_loss,
            "resumed_from_step": int(found[1]["step"]) if found else 0}


def first_round_teacher(teacher) -> tuple:
    """(denoiser round 1 distils, its guidance weight): the teacher as it samples by default.

    Guided distillation: for a conditional teacher with guidance w != 1, round 1 learns two steps of the guided
    teacher, so every student carries the guidance in its weights and samples unguided (guiding a student again
    would apply it twice)."""
    guidance = float(teacher.spec["sampler"].get("guidance", 1.0))
    if teacher.num_classes is not None and guidance != 1.0:
        return GuidedDenoiser(teacher.denoiser, guidance, null_label=teacher.num_classes), guidance
    return teacher.denoiser, guidance


def distill(ctx: StageContext) -> dict:
    p = ctx.params.progressive
    shards = ctx.path("data/shards")
    manifest = read_shard_manifest(shards)
    teacher = load_denoiser(ctx.path("models/teacher"))
    if teacher.spec.get("consistency") or teacher.spec.get("students"):
        raise DataError("models/teacher is not a plain denoiser (a distilled student?); progressive needs the teacher")
    set_torch_threads(teacher.spec, p.torch_threads)
    train = p.trainer_kwargs()
    resume_key = {k: v for k, v in train.items() if k not in ("steps", "checkpoint_every", "log_every")}
    fingerprint = run_fingerprint(teacher.spec, weights_digest(teacher.directory / WEIGHTS_FILE), manifest["digest"],
                                  resume_key, p.teacher_steps, p.weighting)
    checkpoint_root = ctx.path(f"checkpoints/progressive/{fingerprint}")
    ctx.run.set_tags({"checkpoint_dir": checkpoint_root.relative_to(ctx.repo)})

    (target, guidance), previous, students, metrics = first_round_teacher(teacher), teacher.denoiser, {}, {}
    n = p.teacher_steps // 2
    while n >= 1:
        sub = f"steps_{n}"
        spec = {**copy.deepcopy(teacher.spec), "sampler": {**teacher.spec["sampler"], "method": "ddim",
                                                          "grid": "uniform", "steps": n, "guidance": 1.0},
                "distilled_from": {"teacher_steps": 2 * n, "sampler": "ddim", "grid": "uniform",
                                   "teacher_guidance": guidance}}
        with ctx.run.child_run(f"round_{2 * n}_to_{n}", params={"student_steps": n, "teacher_steps": 2 * n, **resume_key},
                               tags={"stage.round_of": ctx.spec.name}) as child:
            run_id, log_fn = child.run_id, child.log_metrics
            try:
                result = train_round(spec, previous, target, n, shards, {**train, "progress_bar": True}, p.weighting,
                                     checkpoint_root / sub, ctx.out_dir / sub / WEIGHTS_FILE, log_fn)
            except (CheckpointMismatchError, NonFiniteLossError) as e:
                raise UserError(f"progressive round {2 * n}->{n}: {e}") from None
            log_fn({"final_loss": result["final_loss"]}, result["steps"])
        save_denoiser(ctx.out_dir / sub, torch.load(ctx.out_dir / sub / WEIGHTS_FILE, weights_only=True), spec)
        students[str(n)] = sub
        metrics[f"round_{n}"] = {**result, "mlflow_run_id": run_id}
        previous = target = load_denoiser(ctx.out_dir / sub).denoiser
        n //= 2
    final = load_denoiser(ctx.out_dir / "steps_1")
    save_denoiser(ctx.out_dir, final.denoiser.state_dict(), {**final.spec, "students": students})
    ctx.manifest.update({"students": students, "teacher_steps": p.teacher_steps,
                         "checkpoint_dir": str(checkpoint_root.relative_to(ctx.repo))})
    ctx.record["round_run_ids"] = {k: r["mlflow_run_id"] for k, r in metrics.items()}
    return {"rounds": {k: {m: v for m, v in r.items() if m != "mlflow_run_id"} for k, r in metrics.items()}}


@flow(name="progressive", description="Progressive distillation of the teacher down to 1 step -> models/progressive/.")
def flow_fn():
    return run_stage_in_flow(SPEC, distill)


if __name__ == "__main__":
    sys.exit(0 if flow_fn(return_state=True).is_completed() else 1)
