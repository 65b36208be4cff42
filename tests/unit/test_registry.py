"""Registered models sample where they are loaded, and an identical model is not registered twice.

A real MLflow sqlite store; the models are tiny saved denoisers of each kind a stage writes (a Heun teacher, a
consistency model, a progressive model with its per-step students). Each registered model is loaded in a fresh
Python process started in another directory (no repo on its path) and must sample exactly what the model
directory samples here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from components.models.store import build_denoiser, load_denoiser, save_denoiser

EXPERIMENT = "registry-test"
MLP = {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 8, "depth": 1, "embed_dim": 8}}


def spec(**extra) -> dict:
    return {"network": MLP, "schedule": {"name": "edm", "kwargs": {}}, "prediction": "edm", "sigma_data": 0.5,
            "data_shape": [2], "num_classes": None, "kind": "points",
            "sampler": {"method": "heun", "grid": "edm", "steps": 4, "guidance": 1.0}, **extra}


def save(directory, model_spec, seed):
    torch.manual_seed(seed)
    save_denoiser(directory, build_denoiser(model_spec).state_dict(), model_spec)


def model_dirs(root):
    save(root / "teacher", spec(), 0)
    save(root / "consistency", spec(consistency={"sigma_min": 0.002, "sigma_max": 80.0},
                                    sampler={"method": "consistency", "grid": "edm", "steps": 1, "guidance": 1.0}), 1)
    progressive = root / "progressive"
    for i, steps in enumerate((1, 2, 4)):
        save(progressive / f"steps_{steps}", spec(sampler={"method": "ddim", "grid": "uniform", "steps": steps,
                                                           "guidance": 1.0}), 10 + i)
    student = load_denoiser(progressive / "steps_1")
    save_denoiser(progressive, student.denoiser.state_dict(),
                  {**student.spec, "students": {str(s): f"steps_{s}" for s in (1, 2, 4)}})
    return {"teacher": root / "teacher", "consistency": root / "consistency", "progressive": progressive}


LOAD_AND_SAMPLE = """
import json, sys, mlflow.pytorch, torch
out = {}
for stage, nfe in json.loads(sys.argv[1]):
    model = mlflow.pytorch.load_model(f"models:/registry-test-{stage}@latest")
    result = model.sample(torch.randn(16, 2, generator=torch.Generator().manual_seed(3)), nfe=nfe)
    out[f"{stage}@{nfe}"] = result.x.tolist()
print(json.dumps(out))
"""


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    import mlflow

    from components.tracking.lineage import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    ensure_experiment(EXPERIMENT, uri, tmp_path)  # artifacts in tmp_path/mlartifacts
    yield uri
    mlflow.set_tracking_uri(None)


def register(directory, stage):
    import mlflow

    from components.tracking.registry import log_and_register_model

    with mlflow.start_run() as run:
        return log_and_register_model(directory, EXPERIMENT, stage, run.info.run_id,
                                      tags={"stage": stage, "git.commit": "abc"}, metrics={"final_loss": 0.5})


def test_each_registered_model_samples_in_a_fresh_process_elsewhere(tmp_path, tracking):
    from mlflow import MlflowClient

    dirs = model_dirs(tmp_path / "models")
    for stage, directory in dirs.items():
        name, version, reused = register(directory, stage)
        assert (name, version, reused) == (f"{EXPERIMENT}-{stage}", "1", False)
        v = MlflowClient().get_model_version(name, version)
        assert v.tags["git.commit"] == "abc" and v.tags["metric.final_loss"] == "0.5" and v.tags["model.digest"]
        assert stage in v.description and "sample(noise, nfe=k)" in v.description

    cases = [("teacher", 8), ("consistency", 1), ("progressive", 1), ("progressive", 2), ("progressive", 3)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": tracking, "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, json.dumps(cases)], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    for stage, nfe in cases:
        noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
        expected = load_denoiser(dirs[stage]).sample(noise, nfe=nfe).x
        assert torch.allclose(torch.tensor(loaded[f"{stage}@{nfe}"]), expected, atol=1e-6), (stage, nfe)
    # progressive picks its per-step students: 2 and 3 NFE use the 2-step student, 1 NFE the 1-step one
    assert loaded["progressive@2"] == loaded["progressive@3"] != loaded["progressive@1"]


def test_an_identical_model_registers_no_new_version_and_uploads_nothing(tmp_path, tracking):
    from mlflow import MlflowClient

    directory = model_dirs(tmp_path / "models")["teacher"]
    assert register(directory, "teacher") == (f"{EXPERIMENT}-teacher", "1", False)
    uploaded = sorted((tmp_path / "mlartifacts").rglob("*"))
    assert any(p.name == "model.pth" for p in uploaded)
    (directory / "samples.png").write_bytes(b"a plot that differs between runs")  # not part of the model
    assert register(directory, "teacher") == (f"{EXPERIMENT}-teacher", "1", True)
    assert sorted((tmp_path / "mlartifacts").rglob("*")) == uploaded
    assert len(MlflowClient().search_model_versions(f"name = '{EXPERIMENT}-teacher'")) == 1

    save(directory, spec(), 99)  # other weights: a new version
    assert register(directory, "teacher") == (f"{EXPERIMENT}-teacher", "2", False)


def test_champion_is_promoted_by_hand(tmp_path, tracking):
    from mlflow import MlflowClient

    from components.tracking.registry import promote

    directory = model_dirs(tmp_path / "models")["teacher"]
    register(directory, "teacher")
    save(directory, spec(), 5)
    register(directory, "teacher")
    assert promote(EXPERIMENT, "teacher", "1") == "1"
    assert str(MlflowClient().get_model_version_by_alias(f"{EXPERIMENT}-teacher", "champion").version) == "1"
    assert promote(EXPERIMENT, "teacher") == "2"  # default: the newest


def test_the_experiment_opens_on_its_training_runs(tmp_path, tracking):
    """MLflow's UI shows the runs table, not the GenAI overview, for experiments of kind custom_model_development."""
    import mlflow
    from mlflow import MlflowClient

    from components.tracking.lineage import ensure_experiment

    assert MlflowClient().get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"
    old = mlflow.create_experiment("made-before-the-tag")  # an experiment an older version created
    ensure_experiment("made-before-the-tag", tracking, tmp_path)
    assert MlflowClient().get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_evaluation_headline_lands_on_the_version_with_those_weights(tmp_path, tracking):
    from mlflow import MlflowClient

    from components.tracking.registry import tag_evaluated_versions

    directory = model_dirs(tmp_path / "models")["teacher"]
    register(directory, "teacher")
    headline = {"teacher": {"nfe1": 3.2, "nfe1_ci": [2.9, 3.5], "best": 1.1, "best_nfe": 16},
                "reflow": {"best": 1.4}}  # no registered reflow model: skipped
    assert tag_evaluated_versions(EXPERIMENT, "sw2_ratio", headline, {"teacher": directory}) == {"teacher": "1"}
    tags = MlflowClient().get_model_version(f"{EXPERIMENT}-teacher", "1").tags
    assert tags["eval.sw2_ratio.best"] == "1.1" and tags["eval.sw2_ratio.nfe1_ci"] == "2.9..3.5"
    save(directory, spec(), 7)  # weights that were never registered: nothing to tag
    assert tag_evaluated_versions(EXPERIMENT, "sw2_ratio", headline, {"teacher": directory}) == {}
