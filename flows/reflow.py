"""`reflow` stage: rectified flow on the teacher's couplings with the one Trainer, initialised from the teacher
(a velocity model on the flow schedule); writes models/reflow/ (model.pt + model.json, Euler sampler).

Round 1 trains on data/couplings/pairs. With `reflow.rounds: k > 1` each later round regenerates the coupling from the
previous round's model (same count, solver, NFE as the couplings stage) and trains again from it
(k-rectified flow). Then, with `reflow.distill_nfe: n > 0` (default 2), the k-RF model is distilled into n Euler
steps on the last round's coupling (gradients through all n steps); models/reflow/ is then the distilled student and
models/reflow/rectified/ keeps the k-RF model. Every round, and the distillation, is its own MLflow child run nested
under the stage's run. Checkpoints live in checkpoints/reflow/<fingerprint>/round<r>/,
outside the DVC output, so an interrupted run resumes. Reported per round: training loss, straightness of the
model's Euler paths, and coupling diagnostics (reflow loss, transport cost, empirical OT cost), never a claim of
optimal transport (a zero reflow loss does not imply it; reference/algorithms-training.md section 4).
"""
from __future__ import annotations

import sys
import time
from typing import Optional

import torch
from prefect import flow

from components.diffusion.grids import make_grid
from components.diffusion.samplers import sample
from components.errors import DataError, UserError
from components.evaluation.metrics import straightness
from components.io import read_json
from components.models.store import WEIGHTS_FILE, LoadedModel, load_denoiser, save_denoiser
from components.objectives.reflow import EulerDistillObjective, ReflowObjective, coupling_diagnostics
from components.training.denoiser_training import run_fingerprint, set_torch_threads
from components.training.reflow_training import (generate_couplings, loaded_from_state, read_couplings,
                                                 student_spec, train_on_coupling)
from components.training.trainer import CheckpointMismatchError, NonFiniteLossError
from flows.couplings import teacher_identity
from flows.stage import StageContext, StageSpec, run_stage_in_flow

COUPLINGS = "data/couplings/pairs"  # the couplings stage's output (its metrics live beside it)
SPEC = StageSpec(name="reflow", output="models/reflow", sections=("couplings", "reflow"))
DIAGNOSTIC_PAIRS = 512  # at most this many noise draws / pairs for straightness and coupling diagnostics
STRAIGHTNESS_STEPS = 32


def check_couplings_match_teacher(ctx: StageContext) -> dict:
    """The couplings' manifest must name the teacher in models/teacher (its weights digest)."""
    manifest = read_json(ctx.path(f"{COUPLINGS}/manifest.json"))
    recorded = manifest.get("teacher") or {}
    current = teacher_identity(ctx.path("models/teacher"))
    for key in ("weights_md5",):
        if recorded.get(key) != current[key]:
            raise DataError(f"{COUPLINGS} was generated from a different teacher ({key} {recorded.get(key)} in "
                            f"its manifest, models/teacher has {current[key]}); rerun `dvc repro couplings`")
    return manifest


@torch.no_grad()
def path_straightness(model: LoadedModel, noise: torch.Tensor, cond: Optional[torch.Tensor]) -> float:
    """Straightness of the model's Euler paths on a fine uniform grid (flow schedule: already the flow frame)."""
    grid = make_grid("uniform", model.schedule, STRAIGHTNESS_STEPS)
    result = sample(model.denoiser, model.schedule, grid, noise, method="euler", cond=cond, return_trajectory=True)
    return straightness(result.trajectory, grid)


def velocity_of(model: LoadedModel, cond: Optional[torch.Tensor]):
    return lambda x_t, t: model.denoiser(x_t, t, cond, target="v")


def train_reflow(ctx: StageContext) -> dict:
    p = ctx.params.reflow
    coupling_manifest = check_couplings_match_teacher(ctx)
    teacher = load_denoiser(ctx.path("models/teacher"))
    spec = student_spec(teacher.spec, steps=p.sampler_steps)  # DataError for a non-velocity teacher
    set_torch_threads(spec, p.torch_threads)
    coupling = read_couplings(ctx.path(COUPLINGS), coupling_manifest["shards"])
    if len(coupling[0]) < p.batch_size:
        raise DataError(f"{COUPLINGS} holds {len(coupling[0])} pairs, fewer than reflow.batch_size={p.batch_size}")
    train = p.trainer_kwargs()
    resume_key = {k: v for k, v in train.items() if k not in ("steps", "checkpoint_every", "log_every")}
    fingerprint = run_fingerprint(spec, coupling_manifest["teacher"], coupling_manifest.get("relative_error_vs_4x_nfe"),
                                  coupling_manifest["count"], resume_key)
    root = ctx.path(f"checkpoints/reflow/{fingerprint}")
    ctx.run.set_tags({"checkpoint_dir": root.relative_to(ctx.repo)})

    g = torch.Generator().manual_seed(p.seed + 12345)  # diagnostics noise, disjoint from the couplings' seeds
    # No more diagnostic paths than pairs: a small CPU run on images otherwise spends minutes on 3 x 32-step
    # straightness solves of 512 images (measured: 5.5 of the 6 minutes of reflow in a 32-pair CIFAR-10 smoke run).
    n_diagnostic = min(DIAGNOSTIC_PAIRS, len(coupling[0]))
    noise = torch.randn((n_diagnostic, *spec["data_shape"]), generator=g)
    cond = torch.arange(n_diagnostic) % spec["num_classes"] if spec["num_classes"] else None
    metrics: dict = {"teacher_straightness": path_straightness(teacher, noise, cond),
                     "couplings_count": len(coupling[0]), "rounds": p.rounds}
    objective = ReflowObjective(p.p_uncond if spec["num_classes"] is not None else 0.0, spec["num_classes"])
    state = teacher.denoiser.state_dict()
    model = teacher
    started = time.time()
    for round_no in range(1, p.rounds + 1):
        if round_no > 1:  # k-rectified flow: re-pair fresh noise through the previous round's model
            coupling = regenerate(model, coupling_manifest, root / f"round{round_no}" / "couplings")[:3]
        export = root / f"round{round_no}" / "export.pt"
        with ctx.run.child_run(f"reflow-round{round_no}", tags={"reflow.round": round_no,
                                                                "reflow.parent_stage": "reflow"}) as child:
            log_fn = child.log_metrics
            result, resumed = _train(spec, state, objective, coupling, train, root / f"round{round_no}" / "ckpt",
                                     export, log_fn, p.torch_threads, {"spec": spec, "round": round_no})
            state = torch.load(export, weights_only=True)
            model = loaded_from_state(spec, state, ctx.out_dir)
            round_metrics = round_report(model, noise, cond, coupling, result, resumed)
            child.log_metrics(round_metrics)
        metrics.update({f"round{round_no}_{k}": v for k, v in round_metrics.items()})
        ctx.manifest.setdefault("rounds", []).append({"round": round_no, **round_metrics})
        ctx.record.setdefault("rounds", []).append({"round": round_no, "mlflow_run_id": child.run_id})
    metrics["straightness"] = metrics[f"round{p.rounds}_straightness"]
    metrics["straightness_ratio"] = metrics["straightness"] / max(metrics["teacher_straightness"], 1e-12)

    if p.distill_nfe:
        save_denoiser(ctx.out_dir / "rectified", state, spec)  # the k-RF model before distillation
        # Unguided like the k-RF model (student_spec): the coupling already carries a guided teacher's guidance.
        distill_spec = {**spec, "objective": "reflow_distill", "sampler": {**spec["sampler"], "steps": p.distill_nfe}}
        distill_train = {**train, "steps": p.distill_steps}
        distill_dir = root / f"distill{p.distill_nfe}"  # another step count is another run, not a resume
        export = distill_dir / "export.pt"
        with ctx.run.child_run(f"reflow-distill-{p.distill_nfe}-step", tags={"reflow.distill_nfe": p.distill_nfe,
                                                                            "reflow.parent_stage": "reflow"}) as child:
            result, _ = _train(distill_spec, state, EulerDistillObjective(p.distill_nfe), coupling, distill_train,
                               distill_dir / "ckpt", export, child.log_metrics, p.torch_threads,
                               {"spec": distill_spec})
            state, spec = torch.load(export, weights_only=True), distill_spec
            distilled = loaded_from_state(spec, state, ctx.out_dir)
            distill_metrics = {"final_loss": result.final_loss, "steps": result.steps,
                               "straightness": path_straightness(distilled, noise, cond)}
            child.log_metrics(distill_metrics)
        metrics.update({f"distill_{k}": v for k, v in distill_metrics.items()})
        metrics["distill_nfe"] = p.distill_nfe
        ctx.manifest["distill"] = {"nfe": p.distill_nfe, "rectified_model": "rectified/", **distill_metrics}
        ctx.record["distill"] = {"nfe": p.distill_nfe, "mlflow_run_id": child.run_id}

    save_denoiser(ctx.out_dir, state, spec)
    ctx.manifest.update({"model": spec, "couplings": {"count": coupling_manifest["count"],
                                                      "nfe": coupling_manifest["nfe"],
                                                      "teacher": coupling_manifest["teacher"]},
                         "checkpoint_dir": str(root.relative_to(ctx.repo)),
                         "optimal_transport": "not claimed: a zero reflow loss does not imply optimal transport"})
    metrics["train_seconds"] = round(time.time() - started, 2)
    return metrics


def _train(spec, state, objective, coupling, train, checkpoint_dir, export, log_fn, threads, fingerprint):
    try:
        return train_on_coupling(spec, state, objective, coupling, train, checkpoint_dir, export, log_fn=log_fn,
                                 torch_threads=threads, fingerprint=fingerprint)
    except (CheckpointMismatchError, NonFiniteLossError) as e:
        raise UserError(str(e)) from None


def regenerate(model: LoadedModel, coupling_manifest: dict, work_dir):
    """A fresh coupling through `model` with the couplings stage's count, solver, NFE (seed shifted: fresh noise)."""
    return generate_couplings(model, coupling_manifest["count"], min(coupling_manifest["count"], 2000),
                              coupling_manifest["nfe"], coupling_manifest["solver"],
                              coupling_manifest["seed"] + 7919, work_dir)


def round_report(model: LoadedModel, noise, cond, coupling, result, resumed: int) -> dict:
    z, x, y = (c[:DIAGNOSTIC_PAIRS] if c is not None else None for c in coupling)
    diagnostics = coupling_diagnostics(z, x, velocity_of(model, y), generator=torch.Generator().manual_seed(0))
    return {"final_loss": result.final_loss, "steps": result.steps, "resumed_from_step": resumed,
            "straightness": path_straightness(model, noise, cond),
            "coupling_reflow_loss": diagnostics["reflow_loss"], "coupling_fixed_point": diagnostics["fixed_point"],
            "coupling_transport_cost": diagnostics["transport_cost"],
            "coupling_assignment_cost": diagnostics["assignment_cost"],
            "coupling_cost_over_assignment": diagnostics["cost_over_assignment"]}


@flow(name="reflow", description="Rectified flow (k rounds), distilled into reflow.distill_nfe Euler steps.")
def flow_fn():
    return run_stage_in_flow(SPEC, train_reflow)


if __name__ == "__main__":
    sys.exit(0 if flow_fn(return_state=True).is_completed() else 1)
