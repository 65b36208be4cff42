"""Lineage across runs: a stage rerun while its upstream was skipped still links to the run that made its input,
and `python -m flows lineage` prints that chain back to the data."""
from __future__ import annotations

import json

import yaml

from tests.conftest import run_dvc, run_flows, run_record
from tests.e2e.test_pipeline import add_probe_stages, set_probe


def test_rerun_with_cached_upstream_links_to_the_producing_run(project):
    from components.tracking.lineage import dvc_locked_hash

    add_probe_stages(project)
    first = run_dvc(project, "repro", "probe_a")  # plain DVC: the parent is this dvc repro invocation's run
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    shard_run = run_record(project, "shard")["mlflow_run_id"]

    set_probe(project, "probe_a", 5)
    second = run_flows(project, "pipeline", "probe_a", "--name", "second")
    assert second.returncode == 0, second.stderr[-3000:]
    outcomes = {line.split()[0]: line.split()[1] for line in second.stdout.splitlines() if " s  mlflow run " in line}
    assert outcomes == {"shard": "Skipped", "probe_a": "Ran"}

    r = run_flows(project, "lineage", "probe_a", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    chain = json.loads(r.stdout)
    assert [c["stage"] for c in chain] == ["probe_a", "shard"]
    probe, shard = chain
    assert probe["upstream"] == {"shard": shard_run} and shard["run_id"] == shard_run
    # made under the first `dvc repro` (its invocation run), then under the pipeline flow's run
    assert shard["parent_run_id"] and probe["parent_run_id"] and shard["parent_run_id"] != probe["parent_run_id"]
    assert probe["params"]["shard.seed"] == str(yaml.safe_load((project / "params.yaml").read_text())["shard"]["seed"])
    assert [d["digest"] for d in probe["inputs"]] == [dvc_locked_hash(project, "data/shards")]
    assert not shard["inputs"] and not shard["missing"]

    by_id = run_flows(project, "lineage", probe["run_id"])  # a run id works too, human-readable output
    assert by_id.returncode == 0
    assert f"upstream    shard -> run {shard_run}" in by_id.stdout
    assert "source data" in by_id.stdout and "data.source=toy2d" in by_id.stdout
