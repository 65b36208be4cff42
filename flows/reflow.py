"""`reflow` stage: rectified flow on the teacher's couplings with the one training recipe, initialised from the
teacher (a velocity model on the flow schedule); writes models/reflow/ (model.pt + model.json, Euler sampler).

Round 1 trains on data/couplings/shards. With `reflow.rounds: k > 1` each later round regenerates the coupling from
the previous round's model and trains again from it (k-rectified flow). Then, with `reflow.distill_nfe: n > 0`
(default 2), the k-RF model is distilled into n Euler steps; models/reflow/ is then the distilled student and
models/reflow/rectified/ keeps the k-RF model. Every round, and the distillation, is an MLflow child run of the
stage's run; checkpoints live in checkpoints/reflow/<fingerprint>/ (an interrupted run resumes). Reported per round:
loss, straightness, coupling diagnostics; never a claim of optimal transport (a zero reflow loss does not imply it).
"""
from __future__ import annotations

import time

from prefect import flow

from components.io import read_json
from components.models.store import load_denoiser, save_denoiser, load_weights
from components.training.recipe import checkpoint_dir
from components.training.reflow_training import check_couplings_teacher, student_spec, teacher_identity, train_reflow
from flows.stage import StageContext, StageSpec, run_stage_in_flow

COUPLINGS = "data/couplings/shards"  # the couplings stage's output (its metrics live beside it)
SPEC = StageSpec(name="reflow", output="models/reflow", sections=("couplings", "reflow"))


def rectify(ctx: StageContext) -> dict:
    p = ctx.params.reflow
    couplings = read_json(ctx.path(f"{COUPLINGS}/manifest.json"))
    teacher_dir = ctx.path("models/teacher")
    check_couplings_teacher(couplings, teacher_identity(teacher_dir), COUPLINGS)
    teacher = load_denoiser(teacher_dir)
    spec = student_spec(teacher.spec, steps=p.sampler_steps)  # DataError for a non-velocity teacher
    root = ctx.use_checkpoint_dir(checkpoint_dir(ctx.path("checkpoints/reflow"), p.train_config(), spec,
                                                 couplings["teacher"], couplings.get("relative_error_vs_4x_nfe"),
                                                 couplings["count"]))
    started = time.time()
    weights, spec, record = train_reflow(teacher, spec, ctx.path(COUPLINGS), couplings, p, root, ctx.out_dir,
                                         ctx.run.child_run, ctx.run.tracking_uri, ctx.params.distributed)
    save_denoiser(ctx.out_dir, load_weights(weights), spec)
    ctx.record["rounds"] = [{"round": r["round"], "mlflow_run_id": r["mlflow_run_id"]} for r in record["rounds"]]
    rounds = [{k: v for k, v in r.items() if k != "mlflow_run_id"} for r in record["rounds"]]
    ctx.manifest.update({"model": spec, "rounds": rounds,
                         "couplings": {k: couplings[k] for k in ("count", "nfe", "teacher")},
                         "optimal_transport": "not claimed: a zero reflow loss does not imply optimal transport"})
    if record["distill"]:
        distill = record["distill"]
        ctx.record["distill"] = {"nfe": distill["nfe"], "mlflow_run_id": distill["mlflow_run_id"]}
        ctx.manifest["distill"] = {k: v for k, v in distill.items() if k != "mlflow_run_id"}
    return {**record["metrics"], "train_seconds": round(time.time() - started, 2)}


@flow(name="reflow", description="Rectified flow (k rounds), distilled into reflow.distill_nfe Euler steps.")
def flow_fn():
    return run_stage_in_flow(SPEC, rectify)
