"""Outputs hash the same when their inputs are the same, and metrics travel with commits and DVC experiments.

Real DVC in a temp git repo, on the cheap stages (shard, and featurizer, which writes a marker for 2-D data)."""
import json

import mlflow
import yaml

from tests.conftest import commit_all, run_dvc, run_flows, run_record, set_params


def locked_out(root, stage: str, path: str) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def test_forced_rerun_keeps_hashes_and_nothing_downstream_goes_stale(project):
    r = run_dvc(project, "repro", "featurizer")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    commit_all(project, "first repro")
    shards, marker = locked_out(project, "shard", "data/shards"), locked_out(project, "featurizer", "models/featurizer")
    first_shard_run = run_record(project, "shard")["mlflow_run_id"]

    r = run_dvc(project, "repro", "--force", "featurizer")  # reruns shard, then featurizer
    assert r.returncode == 0 and "Running stage 'shard'" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert locked_out(project, "shard", "data/shards") == shards
    assert locked_out(project, "featurizer", "models/featurizer") == marker
    status = run_dvc(project, "status", "shard", "featurizer")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout

    # The rerun is a new MLflow run; downstream lineage links to it through the run record, not the output.
    shard, featurizer = run_record(project, "shard"), run_record(project, "featurizer")
    assert shard["mlflow_run_id"] != first_shard_run and shard["output_digest"]
    assert featurizer["upstream"] == {"shard": shard["mlflow_run_id"]}
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(featurizer["mlflow_run_id"])
    assert run.data.tags["upstream.shard.run_id"] == shard["mlflow_run_id"]
    # shard rewrote dvc.lock and its metrics before featurizer read the commit: that is not a code change
    assert run.data.tags["git.commit"] == shard["git_commit"] and not shard["git_commit"].endswith("-dirty")
    assert run.data.tags["params.digest"] and run.data.tags["dvc.lock.digest"]
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert "mlflow_run_id" not in json.dumps(manifest) and "created_unix" not in json.dumps(manifest)

    # An output restored from another run (its record now names a different output) still finds its run.
    record = project / "data/shard/run.json"
    record.write_text(json.dumps({**shard, "output_digest": "something else", "mlflow_run_id": "stale"}))
    r = run_flows(project, "lineage", "shard", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)[0]["run_id"] == shard["mlflow_run_id"]  # newest run tagged with that output.digest


def test_metrics_show_in_experiments_diff_between_revisions_and_survive_a_failed_repro(project):
    assert run_dvc(project, "repro", "shard").returncode == 0
    commit_all(project, "baseline")  # data/shard/metrics.json is committed with dvc.lock
    tracked = run_dvc(project, "metrics", "show", "--json")
    assert "train_count" in tracked.stdout

    for name, n in (("small", 700), ("large", 900)):
        r = run_dvc(project, "exp", "run", "shard", "--name", name, "--set-param", f"data.n_samples={n}")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    show = run_dvc(project, "exp", "show", "--csv")
    assert show.returncode == 0, show.stderr
    rows = {line.split(",")[0] or line.split(",")[1]: line for line in show.stdout.splitlines()}
    header = show.stdout.splitlines()[0].split(",")
    column = header.index("train_count")
    counts = {}
    for line in show.stdout.splitlines()[1:]:
        cells = line.split(",")
        name = next((c for c in cells[:2] if c in ("small", "large", "main", "master", "workspace")), None)
        if name:
            counts[name] = cells[column]
    assert counts.get("small") == "560" and counts.get("large") == "720", (counts, rows)
    assert "!" not in counts.values()

    diff = run_dvc(project, "metrics", "diff", "small", "large", "--json")
    assert diff.returncode == 0, diff.stderr
    change = json.loads(diff.stdout)["data/shard/metrics.json"]["train_count"]
    assert (change["old"], change["new"]) == (560, 720)
    between_commits = run_dvc(project, "metrics", "diff", "HEAD", "large", "--json")
    assert between_commits.returncode == 0 and "train_count" in between_commits.stdout, between_commits.stderr

    # A failed repro (a bad param) does not lose the stage's metrics: dvc status shows only the param change.
    run_dvc(project, "exp", "apply", "large")
    before = (project / "data/shard/metrics.json").read_text()
    set_params(project, {"shard": {"val_fraction": 1.5}})
    r = run_dvc(project, "repro", "shard")
    assert r.returncode != 0
    assert (project / "data/shard/metrics.json").read_text() == before
    status = run_dvc(project, "status", "--json")
    assert "data/shard/metrics.json" not in status.stdout, status.stdout
