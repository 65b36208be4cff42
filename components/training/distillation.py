"""Few-step students of the teacher on the one training recipe: progressive distillation (rounds that halve the
teacher's DDIM steps) and consistency distillation / training.

Progressive: each round's student starts from the previous round's model and regresses the closed-form x-target of
two DDIM steps of it (components/objectives/progressive.py); round 1 distils the teacher as it samples by default
(guided, for a conditional teacher with guidance != 1, so every student carries the guidance and samples
unguided). Every round exports `steps_<n>/` (model.pt + model.json).

Consistency: the teacher's network wrapped as a consistency function in EDM coordinates with the exact sigma_min
boundary (components/diffusion/consistency.py); in distill mode it starts from the teacher's weights.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from components.config import ConsistencyParams, ProgressiveParams, TrainConfig
from components.data.loader import shard_batches
from components.diffusion.guidance import GuidedDenoiser
from components.errors import DataError
from components.models.store import WEIGHTS_FILE, LoadedModel, build_denoiser, load_denoiser, load_weights, save_denoiser
from components.objectives.consistency import ConsistencyObjective, ConsistencyPair
from components.objectives.progressive import ProgressiveObjective
from components.training.recipe import TrainingTask, run_job, set_torch_threads, training_job


def load_plain_teacher(directory: Path | str, stage: str) -> LoadedModel:
    """The teacher model; DataError when it is a distilled student (a consistency model or a set of students)."""
    teacher = load_denoiser(directory)
    if teacher.spec.get("consistency") or teacher.spec.get("students"):
        raise DataError(f"{directory} is not a plain denoiser (a distilled student?); {stage} needs the teacher")
    return teacher


# ---------------------------------------------------------------- progressive distillation

def default_guidance(spec: dict[str, Any]) -> float:
    """The guidance weight a model samples with by default (1 for unconditional models: no guidance)."""
    return float(spec["sampler"].get("guidance", 1.0)) if spec.get("num_classes") is not None else 1.0


def progressive_round_task(args: dict[str, Any], config: TrainConfig, world_size: int,
                           threads: int = 0) -> TrainingTask:
    """One halving round: a student (`args["spec"]`) initialised from the model in `args["init"]` learns two DDIM
    steps of that model (guided with `args["guidance"]` when it is not 1), on the shards `args["shards"]`."""
    spec, n, weighting = args["spec"], args["student_steps"], args["weighting"]
    set_torch_threads(spec, threads)
    previous = load_denoiser(args["init"])
    target = previous.denoiser
    if args["guidance"] != 1.0:
        target = GuidedDenoiser(previous.denoiser, args["guidance"], null_label=previous.num_classes)
    student = build_denoiser(spec)
    student.load_state_dict(previous.denoiser.state_dict())
    objective = ProgressiveObjective(copy.deepcopy(target), student.schedule, n, weighting)
    return TrainingTask(student, objective, shard_batches(args["shards"], config, world_size),
                        fingerprint={"spec": spec, "student_steps": n, "weighting": weighting})


def progressive_distillation(teacher: LoadedModel, shards: Path, p: ProgressiveParams, root: Path, out_dir: Path,
                             open_child, tracking_uri: Optional[str] = None,
                             distributed=None) -> tuple[dict[str, str], dict]:
    """Rounds teacher_steps -> teacher_steps/2 -> ... -> 1, each in a child run `open_child(name, params, tags)`;
    writes `out_dir`/steps_<n>/ per round and the 1-step student at the top with spec["students"] (which
    LoadedModel.sample(noise, nfe=k) uses to pick the student trained for k steps).

    Returns ({"<n>": "steps_<n>"}, {"round_<n>": metrics with "mlflow_run_id"})."""
    guidance, init, students, rounds = default_guidance(teacher.spec), teacher.directory, {}, {}
    n = p.teacher_steps // 2
    while n >= 1:
        sub = f"steps_{n}"
        spec = {**copy.deepcopy(teacher.spec),
                "sampler": {**teacher.spec["sampler"], "method": "ddim", "grid": "uniform", "steps": n, "guidance": 1.0},
                "distilled_from": {"teacher_steps": 2 * n, "sampler": "ddim", "grid": "uniform",
                                   "teacher_guidance": float(teacher.spec["sampler"].get("guidance", 1.0))}}
        args = {"spec": spec, "init": str(init), "guidance": guidance if n == p.teacher_steps // 2 else 1.0,
                "student_steps": n, "weighting": p.weighting, "shards": str(shards)}
        with open_child(f"round_{2 * n}_to_{n}", {"student_steps": n, "teacher_steps": 2 * n, **p.train_config().model_dump()},
                        {"stage.round_of": "progressive"}) as child:
            job = training_job(progressive_round_task, args, p, p.train_config(), root / sub, out_dir / sub / WEIGHTS_FILE,
                               child.run_id, tracking_uri, distributed)
            outcome = run_job(job, log_fn=child.log_metrics)
            child.log_metrics({"final_loss": outcome.final_loss}, outcome.steps)
        # Saved again as a plain state dict (the Trainer's export holds views of the EMA's flat buffer): the same
        # bytes as every model.pt written by save_denoiser.
        save_denoiser(out_dir / sub, load_weights(out_dir / sub / WEIGHTS_FILE), spec)
        students[str(n)] = sub
        rounds[f"round_{n}"] = {"steps": outcome.steps, "final_loss": outcome.final_loss,
                                "resumed_from_step": outcome.resumed_from, "mlflow_run_id": child.run_id}
        init, n = out_dir / sub, n // 2
    final = load_denoiser(out_dir / "steps_1")
    save_denoiser(out_dir, final.denoiser.state_dict(), {**final.spec, "students": students})
    return students, rounds


# ---------------------------------------------------------------- consistency distillation / training

def consistency_spec(base: dict[str, Any], p: ConsistencyParams) -> dict[str, Any]:
    """The consistency model's model.json: `base` (the teacher's spec without its sampler) as a consistency
    function, sampled with multistep consistency sampling. Its intermediate noise levels: geometric (`logsnr`),
    the grid measured best at 2 and 4 steps (bench_consistency_grid: 1.73x and 2.25x the floor vs the Karras
    `edm` points' 4.16x and 3.79x, over 4 noise seeds); at one step every grid is the same single jump."""
    return {**base, "consistency": {"sigma_min": p.sigma_min, "sigma_max": p.sigma_max, "mode": p.mode},
            "sampler": {"method": "consistency", "grid": "logsnr", "steps": p.sampler_steps, "guidance": 1.0}}


def consistency_objective_settings(p: ConsistencyParams) -> dict[str, Any]:
    return {"mode": p.mode, "sigma_min": p.sigma_min, "sigma_max": p.sigma_max, "n_scales": p.n_scales,
            "rho": p.rho, "target": p.target, "target_ema": p.target_ema, "huber_c": p.huber_c}


def consistency_task(args: dict[str, Any], config: TrainConfig, world_size: int, threads: int = 0) -> TrainingTask:
    """The consistency model `args["spec"]` (from the teacher in `args["teacher"]`, or from scratch when it is
    None) trained with the consistency objective `args["objective"]` on the shards `args["shards"]`; exports the
    student's EMA weights."""
    spec, settings = args["spec"], args["objective"]
    set_torch_threads(spec, threads)
    student = build_denoiser(spec)
    teacher = load_denoiser(args["teacher"]) if args["teacher"] else None
    if teacher is not None:
        student.denoiser.load_state_dict(teacher.denoiser.state_dict())
    objective = ConsistencyObjective(teacher=teacher.denoiser if teacher else None, **settings)
    return TrainingTask(ConsistencyPair(student), objective, shard_batches(args["shards"], config, world_size),
                        fingerprint={"spec": spec, "objective": settings, "origin": args["origin"]},
                        export_state=ConsistencyPair.student_state_dict)
