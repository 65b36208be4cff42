"""`featurizer` stage: train the reference classifier of image evaluation on the train split (models/featurizer/).

Image data: a small CNN (components.evaluation.featurizer) is trained on data/shards' train split only, so every
evaluation judges models in the same versioned feature space. Its held-out accuracy is the stage's metric (a
featurizer that cannot tell the classes apart makes FD and class accuracy meaningless).
2-D data: the protocol uses SW2/MMD on the points themselves, so the stage writes a `not_applicable.json`
marker and finishes in about a second; the DAG is the same for every data kind.
"""
from __future__ import annotations

import torch
from prefect import flow

from components.data.shards import read_shard_manifest, read_split
from components.errors import DataError
from components.evaluation import class_accuracy, predict_labels, save_classifier, train_reference_classifier
from components.io import write_json
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
    num_classes = manifest.get("num_classes")
    if not num_classes or num_classes < 2:
        raise DataError("featurizer: image data needs class labels (>= 2 classes) to train the reference "
                        "classifier; use an image_folder with class subfolders or an npz with labels")
    p = ctx.params.featurizer
    train_x, train_y = read_split(shards, "train")
    val_x, val_y = read_split(shards, "val")
    classifier = train_reference_classifier(torch.from_numpy(train_x), torch.from_numpy(train_y), num_classes,
                                            steps=p.steps, batch_size=p.batch_size, lr=p.lr, seed=p.seed)
    save_classifier(classifier, ctx.out_dir)
    val_accuracy = class_accuracy(predict_labels(classifier, torch.from_numpy(val_x)), val_y)
    train_accuracy = class_accuracy(predict_labels(classifier, torch.from_numpy(train_x)), train_y)
    ctx.manifest.update({"applicable": True, "num_classes": num_classes, "train_count": int(len(train_x))})
    return {"applicable": 1, "train_accuracy": train_accuracy, "val_accuracy": val_accuracy}


@flow(name="featurizer", description="Train the reference classifier for image evaluation (models/featurizer/).")
def flow_fn():
    return run_stage_in_flow(SPEC, train_featurizer)
