"""The pipeline flow end to end, with real DVC, a real Prefect server and a real MLflow sqlite store.

The temp project gets two tiny test stages below `shard` (probe_a makes a model, probe_b does not), so the DAG
has a parent and two siblings: changing one stage's param must rerun it alone, a shard param reruns all three.
Targets are always named so the tests never train the real (slow) model stages.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import commit_all, ctrl_c_reaches, interrupt_session, project_env, run_dvc, run_flows, run_record

PROBES = ("probe_a", "probe_b")

PROBE_MODULE = '''"""Test-only stage: reads data/shards, writes its probe.yaml value (probe_a also writes a tiny model)."""
import os

import torch
import yaml
from prefect import flow

from components.models.store import build_denoiser, save_denoiser
from flows.stage import StageSpec, run_stage_in_flow

STAGE = os.environ["DVC_STAGE"]
SPEC = StageSpec(name=STAGE, output=f"data/{STAGE}_out", inputs=("data/shards",), sections=("shard",))
MODEL = {"network": {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 8, "depth": 1, "embed_dim": 8}},
         "schedule": {"name": "edm", "kwargs": {}}, "prediction": "edm", "sigma_data": 0.5,
         "data_shape": [2], "num_classes": None, "kind": "points", "sampler": {}}


def body(ctx):
    value = yaml.safe_load((ctx.repo / "probe.yaml").read_text())[STAGE]["value"]
    (ctx.out_dir / "value.txt").write_text(str(value))
    if STAGE == "probe_a":
        torch.manual_seed(0)
        save_denoiser(ctx.out_dir, build_denoiser(MODEL).state_dict(), MODEL)
    return {"value": value}


@flow(name="probe")
def flow_fn():
    return run_stage_in_flow(SPEC, body)
'''


def add_probe_stages(root: Path) -> None:
    """Two stages depending on shard, declared in dvc.yaml like real stages, registered in flows.STAGES."""
    (root / "flows" / "probe.py").write_text(PROBE_MODULE)
    init = root / "flows" / "__init__.py"
    init.write_text(init.read_text() + "\nSTAGES.update({'probe_a': 'flows.probe', 'probe_b': 'flows.probe'})\n")
    (root / "probe.yaml").write_text(yaml.safe_dump({p: {"value": 1} for p in PROBES}))
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    for probe in PROBES:
        dvc["stages"][probe] = {
            "cmd": f"python -m flows {probe}",
            "deps": ["flows/probe.py", "flows/stage.py", "data/shards"],
            "params": ["shard", {"probe.yaml": [f"{probe}.value"]}],
            "outs": [f"data/{probe}_out"],
            "metrics": [{f"data/{probe}/metrics.json": {"cache": False}}],
        }
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    commit_all(root, "probe stages")


def ran_stages(dvc_stdout: str) -> set[str]:
    return {line.split("'")[1] for line in dvc_stdout.splitlines() if line.startswith("Running stage '")}


def set_probe(root: Path, probe: str, value: int) -> None:
    data = yaml.safe_load((root / "probe.yaml").read_text())
    data[probe]["value"] = value
    (root / "probe.yaml").write_text(yaml.safe_dump(data))


def locked_params(root: Path, stage: str) -> dict:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return lock["stages"][stage]["params"]


def test_bad_requests_fail_before_anything_runs(project):
    cases = [
        (["pipeline", "--set", "shard.no_such_key=1"], {}, "shard.no_such_key"),
        (["pipeline", "--set", "shard.seed=abc"], {}, "shard.seed"),
        (["pipeline", "no_such_stage"], {}, "unknown target stage 'no_such_stage'"),
        (["pipeline", "shard"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9/"}, "MLflow server not reachable at http://127.0.0.1:9/"),
        (["pipeline", "shard"], {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, "Prefect server not reachable at http://127.0.0.1:9/api"),
        (["lineage", "no_such_stage"], {}, "neither an MLflow run id nor a stage"),
    ]
    params_before = (project / "params.yaml").read_text()
    for args, env, expected in cases:
        r = run_flows(project, *args, **env)
        assert r.returncode == 2, (args, r.stderr[-1500:])
        assert expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
    assert not (project / "dvc.lock").exists() and not (project / "data" / "shards").exists()
    assert (project / "params.yaml").read_text() == params_before

    # valid params, but the stage itself fails: the flow stops naming the stage; the parent run is FAILED
    r = run_flows(project, "pipeline", "shard", "--set", "data.source=npz", "--set", "data.path=missing.npz")
    assert r.returncode == 2 and "stage 'shard' failed" in r.stderr, r.stderr[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diffusion-distill").experiment_id],
                              filter_string="tags.pipeline = 'true'")
    assert [run.info.status for run in runs] == ["FAILED"]
    assert runs[0].data.tags["stage.shard.outcome"] == "Failed"


def test_repro_twice_then_one_param_reruns_that_stage_only(project):
    add_probe_stages(project)
    r = run_dvc(project, "repro", *PROBES)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert ran_stages(r.stdout) == {"shard", *PROBES}
    r = run_dvc(project, "repro", *PROBES)
    assert r.returncode == 0 and ran_stages(r.stdout) == set()
    set_probe(project, "probe_a", 2)
    r = run_dvc(project, "repro", *PROBES)
    assert r.returncode == 0 and ran_stages(r.stdout) == {"probe_a"}  # not its parent, not its sibling
    assert (project / "data/probe_a_out/value.txt").read_text() == "2"


def wait_for_deployment(name: str, timeout: float = 180.0):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(name)

    import asyncio

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return asyncio.run(read())
        except ObjectNotFound:
            time.sleep(1.0)
    raise AssertionError(f"deployment {name} did not appear within {timeout} s")


def task_runs_of(flow_run_id) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return sorted(asyncio.run(read()), key=lambda t: t.start_time)


def test_served_deployment_run_with_override(project, prefect_api):
    """Triggered through the Prefect API as the UI's Run button does; DVC, MLflow and the registry agree."""
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.tracking.lineage import dvc_locked_hash
    from components.tracking.registry import registered_model_alias
    from components.tracking.runs import child_runs

    add_probe_stages(project)
    serve = subprocess.Popen([sys.executable, "-m", "flows", "serve"], cwd=project, env=project_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             preexec_fn=ctrl_c_reaches)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            wait_for_deployment("pipeline/all")
            assert wait_for_deployment("pipeline/probe_a").parameters == {"targets": ["probe_a"]}
            flow_run = run_deployment("pipeline/all", timeout=420, parameters={
                "targets": list(PROBES), "overrides": ["shard.seed=7"], "run_name": "seed-7"})
            assert flow_run.state.is_completed(), flow_run.state
            tasks = task_runs_of(flow_run.id)
    finally:
        interrupt_session(serve, 30)
    # stages ran in DAG order, each as its own task, each really run by DVC
    assert [t.name for t in tasks] == ["shard", "probe_a", "probe_b"]
    assert all(t.state.name == "Ran" for t in tasks)
    # DVC: the override is in params.yaml, dvc.lock and a saved experiment
    assert yaml.safe_load((project / "params.yaml").read_text())["shard"]["seed"] == 7
    for stage in ("shard", *PROBES):
        assert locked_params(project, stage)["params.yaml"]["shard"]["seed"] == 7
    exps = run_dvc(project, "exp", "list", "--name-only")
    assert "seed-7" in exps.stdout.split(), exps.stdout + exps.stderr
    assert run_dvc(project, "status", *PROBES).stdout.strip().endswith("up to date.")
    # MLflow: one parent, three children that used the override, links and digests consistent with dvc.lock
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name("diffusion-distill").experiment_id],
                                 filter_string="tags.pipeline = 'true'")
    assert len(parents) == 1 and parents[0].info.run_name == "seed-7"
    parent = parents[0]
    assert parent.data.params["override.shard.seed"] == "7" and parent.data.tags["dvc.exp.name"] == "seed-7"
    children = {c["stage"]: c for c in child_runs(parent.info.run_id, "diffusion-distill", uri)}
    assert set(children) == {"shard", *PROBES}
    assert all(c["params"]["shard.seed"] == "7" and c["status"] == "FINISHED" for c in children.values())
    shard_digest = dvc_locked_hash(project, "data/shards")
    for probe in PROBES:
        assert children[probe]["upstream"] == {"shard": children["shard"]["run_id"]}
        assert [d["digest"] for d in children[probe]["inputs"]] == [shard_digest]
        assert run_record(project, probe)["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.data.tags["stage.probe_b.run_id"] == children["probe_b"]["run_id"]
    # registry: the model-producing stage registered <experiment>-<stage>, @latest is this run's model
    import mlflow

    mlflow.set_tracking_uri(uri)
    version = registered_model_alias("diffusion-distill", "probe_a")
    assert version is not None and version.run_id == children["probe_a"]["run_id"]
    assert registered_model_alias("diffusion-distill", "probe_b") is None


def test_two_pipeline_runs_at_once_do_not_corrupt_anything(project):
    """Two overrides at once: the runs are serialised (the second waits), and afterwards params.yaml, dvc.lock,
    the output's manifest and the two saved DVC experiments all agree with the run that finished last."""
    seeds = (11, 12)
    procs = [subprocess.Popen([sys.executable, "-m", "flows", "pipeline", "shard", "--set", f"shard.seed={seed}",
                               "--name", f"seed-{seed}"], cwd=project, env=project_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in seeds]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    waited = [i for i, o in enumerate(outputs) if "waiting for it to finish" in o]
    assert len(waited) == 1, "exactly one run should have waited for the other"
    assert all(re.search(r"^shard\s+Ran\s", o, re.M) for o in outputs)
    last_seed = seeds[waited[0]]
    assert yaml.safe_load((project / "params.yaml").read_text())["shard"]["seed"] == last_seed
    assert locked_params(project, "shard")["params.yaml"]["shard"]["seed"] == last_seed
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert manifest["lineage"]["params"]["shard"]["seed"] == last_seed
    r = run_dvc(project, "status", "shard")
    assert r.returncode == 0 and "up to date" in r.stdout
    exps = run_dvc(project, "exp", "list", "--name-only").stdout.split()
    assert {"seed-11", "seed-12"} <= set(exps)
