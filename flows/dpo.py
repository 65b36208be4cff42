"""`dpo` stage: Diffusion-DPO fine-tuning of a copy of the reference model against the frozen reference, on the
pairs of data/pairs/, with the one Trainer -> models/dpo/ (model-store format, so evaluate samples it like the
teacher). A `holdout_fraction` of the pairs is kept out of training to measure the implicit accuracy.

models/dpo/dpo.json records beta, the reference model dir and the reward (the Bradley-Terry model is copied next
to it), which is what evaluate needs for the win rate. Checkpoints: checkpoints/dpo/<fingerprint>/ (resumable).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from prefect import flow

from components.config import Params
from components.models.store import WEIGHTS_FILE, load_denoiser, save_spec
from components.preferences.finetune import dpo_pairs, dpo_task, write_dpo_info
from components.training.recipe import checkpoint_dir, run_job, training_job
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="dpo", output="models/dpo", inputs=("data/pairs", "models/teacher"), sections=("preferences", "dpo"))


def resolve_spec(repo: Path, params: Params) -> StageSpec:
    reference = f"models/{params.preferences.model}"
    return dataclasses.replace(SPEC, inputs=("data/pairs", reference))


def train_dpo(ctx: StageContext) -> dict:
    p = ctx.params.dpo
    reference_rel = ctx.spec.inputs[1]
    reference = load_denoiser(ctx.path(reference_rel))
    train_pairs, heldout, pair_manifest = dpo_pairs(reference, reference_rel, ctx.path("data/pairs"),
                                                    p.holdout_fraction, p.seed)
    root = ctx.use_checkpoint_dir(checkpoint_dir(ctx.path("checkpoints/dpo"), p.train_config(), reference.spec,
                                                 pair_manifest["digest"], p.beta, p.holdout_fraction))
    ctx.run.set_tags({"beta": p.beta})
    args = {"reference": str(reference.directory), "pairs": str(ctx.path("data/pairs")), "beta": p.beta,
            "holdout_fraction": p.holdout_fraction, "split_seed": p.seed}
    started = time.time()
    outcome = run_job(training_job(dpo_task, args, p, p.train_config(), root, ctx.out_dir / WEIGHTS_FILE, ctx.run.run_id,
                                   ctx.run.tracking_uri, ctx.params.distributed), log_fn=ctx.log_metrics)
    seconds = time.time() - started
    spec = {**reference.spec, "finetuned_from": reference_rel}
    save_spec(ctx.out_dir, spec)

    accuracy = write_dpo_info(ctx.out_dir, reference, reference_rel, ctx.path("data/pairs"), pair_manifest,
                              len(train_pairs), heldout, p.beta, p.seed)
    ctx.manifest.update({"model": spec, "beta": p.beta})
    last = outcome.history[-1] if outcome.history else {}
    return {"steps": outcome.steps, "final_loss": outcome.final_loss, "beta": p.beta,
            "implicit_accuracy_train": last.get("implicit_accuracy", float("nan")),
            "implicit_accuracy_heldout": accuracy, "pairs_train": len(train_pairs),
            "train_seconds": round(seconds, 2)}


@flow(name="dpo", description="Diffusion-DPO fine-tuning against the frozen reference -> models/dpo/.")
def flow_fn():
    return run_stage_in_flow(resolve_spec, train_dpo)
