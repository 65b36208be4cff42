"""The featurizer stage through `python -m flows featurizer`, and the image branch of evaluate that uses it.

2-D data: a not-applicable marker only. Images (scikit-learn's bundled digits): the classifier is trained on the
train split (through the one training recipe, in one process or on 2 launched ranks) and scores well above chance
on the held-out split; evaluate then reports FD / precision / recall / class accuracy in its feature space,
recomputed here independently from the saved classifier and model.
"""
from __future__ import annotations

import json

import pytest
import torch

from components.config import DataParams
from components.data.shards import read_split, write_shards
from components.data.sources import load_source
from components.evaluation import (class_accuracy, extract_features, frechet_distance,
                                   load_classifier, predict_labels, validate_metrics_schema)
from components.io import write_json
from components.models.store import build_denoiser, load_denoiser, save_denoiser
from tests.conftest import commit_all, run_flows, run_record, set_params
from tests.stage.test_distributed_stages import stage_on_ranks


def write_shards_for(project, data: DataParams) -> None:
    shards = project / "data" / "shards"
    shards.mkdir(parents=True)
    write_json(shards / "manifest.json", write_shards(load_source(data), shards, val_fraction=0.2,
                                                      samples_per_shard=400, min_shards=2, seed=0, progress=False))


def test_points_data_gets_a_marker_and_no_classifier(project):
    write_shards_for(project, DataParams(n_samples=600))
    r = run_flows(project, "featurizer")
    assert r.returncode == 0, r.stderr[-3000:]
    out = project / "models" / "featurizer"
    assert json.loads((out / "not_applicable.json").read_text())["kind"] == "points"
    assert not (out / "classifier.pt").exists()
    assert json.loads((project / "data" / "featurizer" / "metrics.json").read_text())["applicable"] == 0
    assert json.loads((out / "manifest.json").read_text())["lineage"]["stage"] == "featurizer"


def test_digits_featurizer_on_two_ranks_writes_a_classifier_with_lineage_and_resumes(project):
    """Issue 15: the featurizer trains through the one recipe, so the `distributed` section alone puts it on 2 ranks
    (train shards split by rank); its checkpoint resumes, here in one process when `steps` is raised."""
    write_shards_for(project, DataParams(source="digits"))
    set_params(project, {"featurizer": {"steps": 60, "batch_size": 64, "log_every": 20},
                         "distributed": {"processes_per_node": 2}})
    commit_all(project, "digits featurizer on 2 ranks")
    assert stage_on_ranks(project, "featurizer") == 2
    metrics = json.loads((project / "data" / "featurizer" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 60 and metrics["resumed_from_step"] == 0
    val_x, val_y = read_split(project / "data" / "shards", "val")
    classifier = load_classifier(project / "models" / "featurizer")
    assert metrics["val_accuracy"] == pytest.approx(class_accuracy(predict_labels(classifier, torch.from_numpy(val_x)),
                                                                   val_y))
    assert metrics["val_accuracy"] > 0.5  # 10 classes: chance is 0.1
    manifest = json.loads((project / "models" / "featurizer" / "manifest.json").read_text())
    assert manifest["lineage"]["stage"] == "featurizer" and run_record(project, "featurizer")["mlflow_run_id"]
    assert [i["path"] for i in manifest["lineage"]["inputs"]] == ["data/shards"]
    assert list((project / manifest["checkpoint_dir"]).glob("step00000060/trainer_state.json"))

    set_params(project, {"featurizer": {"steps": 80}, "distributed": {"processes_per_node": 1}})
    commit_all(project, "20 more steps in one process")
    r = run_flows(project, "featurizer")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((project / "data" / "featurizer" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 60 and metrics["steps"] == 80 and metrics["processes"] == 1
    assert metrics["val_accuracy"] > 0.5


def conditional_zero_unet(directory, guidance: float) -> None:
    """A conditional UNet with zero weights (D = c_skip x) and classifier-free guidance as its default."""
    spec = {"network": {"kind": "unet", "kwargs": {"image_size": 8, "in_channels": 1, "base_channels": 8,
                                                   "channel_mult": [1], "num_res_blocks": 1,
                                                   "attention_resolutions": [], "num_classes": 10}},
            "schedule": {"name": "edm", "kwargs": {}}, "prediction": "edm", "sigma_data": 0.5,
            "data_shape": [1, 8, 8], "num_classes": 10, "kind": "image",
            "sampler": {"method": "heun", "grid": "edm", "steps": 8, "guidance": guidance}}
    state = {k: torch.zeros_like(v) for k, v in build_denoiser(spec).state_dict().items()}
    save_denoiser(directory, state, spec)
    (directory / "manifest.json").write_text(json.dumps({"lineage": {"stage": "teacher", "mlflow_run_id": "img"}}))


def test_digits_featurizer_trains_on_train_split_and_evaluate_scores_images_in_its_space(project):
    write_shards_for(project, DataParams(source="digits"))
    conditional_zero_unet(project / "models" / "teacher", guidance=2.0)
    set_params(project, {"featurizer": {"steps": 60, "batch_size": 64},
                         "evaluate": {"models": ["teacher"], "n_samples": 40, "nfe": [2, 4],
                                      "straightness_steps": 4, "image_grid_size": 16}})
    commit_all(project, "digits")
    r = run_flows(project, "featurizer")
    assert r.returncode == 0, r.stderr[-3000:]
    classifier = load_classifier(project / "models" / "featurizer")
    featurizer_metrics = json.loads((project / "data" / "featurizer" / "metrics.json").read_text())
    val_x, val_y = read_split(project / "data" / "shards", "val")
    val_accuracy = class_accuracy(predict_labels(classifier, torch.from_numpy(val_x)), val_y)
    assert featurizer_metrics["val_accuracy"] == pytest.approx(val_accuracy)
    assert val_accuracy > 0.5  # 10 classes: chance is 0.1

    r = run_flows(project, "evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((project / "data" / "evaluate" / "metrics.json").read_text())
    validate_metrics_schema(metrics)
    assert metrics["kind"] == "image" and metrics["dataset"] == "digits"
    # the reference set is the train split; the floor is the mean FD of 10 draws of n val images against it
    train_x, _ = read_split(project / "data" / "shards", "train")
    ref_features = extract_features(classifier, torch.from_numpy(train_x))  # float32 convs: rel 1e-5 across processes
    val, g = torch.from_numpy(val_x), torch.Generator().manual_seed(0)
    draws = [frechet_distance(extract_features(classifier, val[torch.randperm(len(val), generator=g)[:40]]),
                              ref_features) for _ in range(10)]
    assert metrics["floor"]["fd"] == pytest.approx(sum(draws) / len(draws), rel=1e-5)
    model = load_denoiser(project / "models" / "teacher")
    noise = torch.randn((40, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = torch.arange(40) % 10
    result = model.sample(noise, nfe=4, cond=cond)
    entry = metrics["models"]["teacher"]["nfe"]["4"]
    assert entry["nfe_actual"] == result.nfe and result.nfe % 2 == 0  # guided: 2 NFE per denoiser call
    assert entry["fd"] == pytest.approx(frechet_distance(extract_features(classifier, result.x), ref_features),
                                        rel=1e-5)
    assert entry["fd_ratio"] == pytest.approx(entry["fd"] / metrics["floor"]["fd"])
    assert entry["class_accuracy"] == pytest.approx(class_accuracy(predict_labels(classifier, result.x), cond))
    assert 0.0 <= entry["precision"] <= 1.0 and 0.0 <= entry["recall"] <= 1.0
    report = project / "data" / "evaluate" / "report"
    for name in ("samples_teacher_nfe2.png", "samples_teacher_nfe4.png", "fd_vs_nfe.png", "class_accuracy_vs_nfe.png"):
        assert (report / name).stat().st_size > 500, name
    assert metrics["straightness"]["teacher"] >= 0.0
