"""The shard stage through its real entry point (`python -m flows shard`): outputs, lineage, bad input."""
import json
import shutil

import numpy as np

from tests.conftest import count_samples_with_plain_tar, run_flows, set_params, run_record


def _mlflow_run(project, run_id):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    return client.get_run(run_id)


def test_shard_stage_writes_shards_manifest_metrics_and_mlflow_run(project):
    r = run_flows(project, "shard")
    assert r.returncode == 0, r.stderr[-3000:]
    out = project / "data" / "shards"
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((project / "data" / "shard" / "metrics.json").read_text())
    assert metrics["train_count"] == 480 and metrics["val_count"] == 120
    assert count_samples_with_plain_tar(out, "train") == manifest["splits"]["train"]["count"] == 480
    assert count_samples_with_plain_tar(out, "val") == manifest["splits"]["val"]["count"] == 120
    lineage = manifest["lineage"]
    assert lineage["stage"] == "shard" and lineage["params"]["data"]["n_samples"] == 600
    record = run_record(project, "shard")
    run = _mlflow_run(project, record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "shard"
    assert run.data.tags["git.commit"] == record["git_commit"] != "unknown"
    assert run.data.tags["output.digest"] == record["output_digest"]
    assert "dvc.lock.digest" in run.data.tags
    assert run.data.params["shard.samples_per_shard"] == "100"
    assert run.data.metrics["train_count"] == 480
    assert not list(project.glob("data/.shards.*")), "temp dirs left behind"


def test_bad_param_stops_before_anything_is_written(project):
    set_params(project, {"shard": {"val_fraction": 1.5}})
    r = run_flows(project, "shard")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: params.yaml: shard.val_fraction = 1.5: Input should be less than 1"]
    assert not (project / "data" / "shards").exists()


def test_bad_data_fails_with_one_line_and_keeps_the_previous_output(project):
    assert run_flows(project, "shard").returncode == 0
    before = sorted(p.name for p in (project / "data" / "shards").iterdir())
    bad = project / "bad.npz"
    np.savez(bad, x=np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32))
    set_params(project, {"data": {"source": "npz", "path": str(bad)}})
    r = run_flows(project, "shard")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last == "error: npz data has NaN/inf in 1 sample(s) (first at index 0)"
    assert sorted(p.name for p in (project / "data" / "shards").iterdir()) == before
    assert not list((project / "data").glob(".shards.*"))


def test_missing_source_path_names_the_path(project):
    set_params(project, {"data": {"source": "image_folder", "path": "no/such/folder"}})
    shutil.rmtree(project / "data", ignore_errors=True)
    r = run_flows(project, "shard")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: data.path does not exist: no/such/folder"
    assert not (project / "data" / "shards").exists()
