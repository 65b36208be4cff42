"""`featurizer` stage: train the reference classifier of image evaluation on the train split (models/featurizer/).

Image data: a small CNN (components.evaluation.featurizer) is trained on data/shards' train split only, with the one
training recipe (DeepSpeed; in one process, or on the ranks of the `distributed` section), so every evaluation
judges models in the same versioned feature space. Its held-out accuracy is the stage's metric (a featurizer that
cannot tell the classes apart makes FD and class accuracy meaningless). Checkpoints live in
checkpoints/featurizer/<fingerprint>/, so an interrupted run resumes.
2-D data: the protocol uses SW2/MMD on the points themselves, so the stage writes a `not_applicable.json`
marker and finishes in about a second; the DAG is the same for every data kind.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import torch
from prefect import flow

from components.data.shards import read_shard_manifest, read_split
from components.evaluation import class_accuracy, load_classifier, predict_labels
from components.evaluation.featurizer import WEIGHTS_FILENAME, classifier_config, save_classifier_config
from components.io import write_json
from components.training.classifier_training import reference_classifier_task
from components.training.recipe import checkpoint_dir, run_job, training_job
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="featurizer", output="models/featurizer", sections=("featurizer",))
NOT_APPLICABLE = "not_applicable.json"


def train_featurizer(ctx: StageContext) -> dict:
    shards = ctx.path("data/shards")
    manifest = read_shard_manifest(shards)
    if manifest["kind"] != "image":
        write_json(ctx.out_dir / NOT_APPLICABLE,
                   {"kind": manifest["kind"], "reason": "2-D data is evaluated with SW2/MMD on the points"})
        ctx.manifest["applicable"] = False
        return {"applicable": 0}
    config = classifier_config(manifest)
    classifier = asdict(config)
    p = ctx.params.featurizer
    root = ctx.use_checkpoint_dir(checkpoint_dir(ctx.path("checkpoints/featurizer"), p.train_config(), classifier,
                                                 manifest["digest"]))
    started = time.time()
    job = training_job(reference_classifier_task, {"classifier": classifier, "shards": str(shards)}, p,
                       p.train_config(), root, ctx.out_dir / WEIGHTS_FILENAME, ctx.run.run_id, ctx.run.tracking_uri,
                       ctx.params.distributed)
    outcome = run_job(job, log_fn=ctx.log_metrics)
    train_seconds = time.time() - started
    save_classifier_config(config, ctx.out_dir)
    model = load_classifier(ctx.out_dir)
    train_x, train_y = read_split(shards, "train")
    val_x, val_y = read_split(shards, "val")
    ctx.manifest.update({"applicable": True, "num_classes": classifier["num_classes"], "train_count": len(train_x)})
    return {"applicable": 1, "val_accuracy": class_accuracy(predict_labels(model, torch.from_numpy(val_x)), val_y),
            "train_accuracy": class_accuracy(predict_labels(model, torch.from_numpy(train_x)), train_y),
            "steps": outcome.steps, "final_loss": outcome.final_loss, "train_seconds": round(train_seconds, 2),
            "processes": ctx.params.distributed.world_size, "resumed_from_step": outcome.resumed_from}


@flow(name="featurizer", description="Train the reference classifier for image evaluation (models/featurizer/).")
def flow_fn():
    return run_stage_in_flow(SPEC, train_featurizer)
