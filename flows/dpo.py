"""`dpo` stage: Diffusion-DPO fine-tuning of a copy of the reference model against the frozen reference, on the
pairs of data/pairs/, with the one Trainer -> models/dpo/ (model-store format, so evaluate samples it like the
teacher). A `holdout_fraction` of the pairs is kept out of training to measure the implicit accuracy.

models/dpo/dpo.json records beta, the reference model dir and the reward (the Bradley-Terry model is copied next
to it), which is what evaluate needs for the win rate. Checkpoints: checkpoints/dpo/<fingerprint>/ (resumable).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time

from prefect import flow

from components.config import Params, load_params
from components.errors import DataError, UserError
from components.io import write_json
from components.models.store import SPEC_FILE, WEIGHTS_FILE, load_denoiser
from components.objectives.dpo import default_mse_target
from components.preferences.alignment import DPO_INFO_FILE, heldout_implicit_accuracy
from components.preferences.finetune import fine_tune_dpo, time_sampler_for
from components.preferences.pairs import read_pair_shards
from components.training.denoiser_training import run_fingerprint, set_torch_threads
from components.training.trainer import CheckpointMismatchError, NonFiniteLossError
from flows.runtime import repo_root
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="dpo", output="models/dpo", inputs=("data/pairs", "models/teacher"), sections=("preferences", "dpo"))


def resolve_spec(params: Params) -> StageSpec:
    reference = f"models/{params.preferences.model}"
    return dataclasses.replace(SPEC, inputs=("data/pairs", reference))


def train_dpo(ctx: StageContext) -> dict:
    p = ctx.params.dpo
    reference_rel = ctx.spec.inputs[1]
    reference = load_denoiser(ctx.path(reference_rel))
    set_torch_threads(reference.spec, p.torch_threads)
    pairs, pair_manifest = read_pair_shards(ctx.path("data/pairs"))
    if list(pairs.x_w.shape[1:]) != list(reference.spec["data_shape"]):
        raise DataError(f"data/pairs holds samples of shape {list(pairs.x_w.shape[1:])}, but {reference_rel} "
                        f"models data of shape {reference.spec['data_shape']}")
    train_pairs, heldout = pairs.split(p.holdout_fraction, p.seed)
    train = p.trainer_kwargs()
    if len(train_pairs) < train["batch_size"]:
        raise DataError(f"dpo.batch_size={train['batch_size']} is more than the {len(train_pairs)} training pairs; "
                        "lower it or collect more pairs (preferences.groups x k)")
    resume_key = {k: v for k, v in train.items() if k not in ("steps", "checkpoint_every", "log_every")}
    fingerprint = run_fingerprint(reference.spec, pair_manifest["digest"], p.beta, p.holdout_fraction, resume_key)
    checkpoint_dir = ctx.path(f"checkpoints/dpo/{fingerprint}")
    ctx.run.set_tags({"checkpoint_dir": checkpoint_dir.relative_to(ctx.repo), "beta": p.beta})
    started = time.time()
    try:
        result = fine_tune_dpo(reference, train_pairs, beta=p.beta, train=train, checkpoint_dir=checkpoint_dir,
                               export_path=ctx.out_dir / WEIGHTS_FILE, log_fn=ctx.log_metrics)
    except (CheckpointMismatchError, NonFiniteLossError, ValueError) as e:
        raise UserError(f"dpo: {e}") from None
    seconds = time.time() - started
    spec = {**reference.spec, "finetuned_from": reference_rel}
    (ctx.out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")

    tuned = load_denoiser(ctx.out_dir)
    accuracy = heldout_implicit_accuracy(tuned.denoiser, reference.denoiser, heldout, p.beta,
                                         time_sampler_for(reference.spec),
                                         target=default_mse_target(reference.spec["prediction"]), seed=p.seed)
    reward = dict(pair_manifest["reward"])
    if reward.get("kind") == "bradley_terry":  # keep the learned reward with the model (evaluate scores with it)
        shutil.copytree(ctx.path("data/pairs") / reward["path"], ctx.out_dir / reward["path"])
    write_json(ctx.out_dir / DPO_INFO_FILE, {
        "beta": p.beta, "reference": reference_rel, "reward": reward, "pairs_train": len(train_pairs),
        "pairs_heldout": len(heldout), "implicit_accuracy_heldout": accuracy})
    ctx.manifest.update({"model": spec, "beta": p.beta, "checkpoint_dir": str(checkpoint_dir.relative_to(ctx.repo))})
    last = result.history[-1] if result.history else {}
    return {"steps": result.steps, "final_loss": result.final_loss, "beta": p.beta,
            "implicit_accuracy_train": last.get("implicit_accuracy", float("nan")),
            "implicit_accuracy_heldout": accuracy, "pairs_train": len(train_pairs),
            "train_seconds": round(seconds, 2)}


@flow(name="dpo", description="Diffusion-DPO fine-tuning against the frozen reference -> models/dpo/.")
def flow_fn():
    from prefect import get_run_logger
    from prefect.states import Failed

    try:
        spec = resolve_spec(load_params(repo_root() / "params.yaml"))
    except UserError as e:
        get_run_logger().error(f"{type(e).__name__}: {e}")
        return Failed(message=f"{e}", data=e)
    return run_stage_in_flow(spec, train_dpo)


if __name__ == "__main__":
    sys.exit(0 if flow_fn(return_state=True).is_completed() else 1)
