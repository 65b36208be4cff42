"""DVC end to end in a temp copy of the repo: repro, no-op repro, param change reruns, outputs readable.

These target the `shard` stage (the rest of the DAG trains models at full size; the pipeline tests in
test_pipeline.py cover multi-stage staleness with tiny probe stages)."""
import json

from tests.conftest import commit_all, count_samples_with_plain_tar, run_dvc, set_params


def test_repro_then_noop_then_param_change_reruns(project):
    r = run_dvc(project, "repro", "shard")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Running stage 'shard'" in r.stdout
    lock = (project / "dvc.lock").read_text()
    assert "data/shards" in lock and "md5" in lock

    r = run_dvc(project, "repro", "shard")
    assert r.returncode == 0
    assert "Running stage" not in r.stdout  # nothing changed, nothing runs

    status = run_dvc(project, "status", "shard")
    assert "up to date" in status.stdout

    commit_all(project, "repro")
    set_params(project, {"shard": {"samples_per_shard": 60}})
    r = run_dvc(project, "repro", "shard")
    assert r.returncode == 0 and "Running stage 'shard'" in r.stdout
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["train"]["samples_per_shard"] == 60
    assert count_samples_with_plain_tar(project / "data/shards", "train") == manifest["splits"]["train"]["count"]
    metrics = run_dvc(project, "metrics", "show", "--json")
    assert json.loads(metrics.stdout)  # dvc reads the stage's metrics file


def test_lineage_digest_comes_from_dvc_lock_after_repro(project):
    assert run_dvc(project, "repro", "shard").returncode == 0
    from components.tracking.lineage import describe_input, dvc_locked_hash

    locked = dvc_locked_hash(project, "data/shards")
    assert locked and locked.endswith(".dir")
    rec = describe_input(project, "data/shards", "shard")
    assert rec["digest"] == locked and rec["digest_source"] == "dvc.lock"
    assert rec["stage"] == "shard" and rec["run_id"]
