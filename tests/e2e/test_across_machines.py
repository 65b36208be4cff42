"""The pipeline across machines, with real processes on 127.0.0.1: a DVC remote (push, fresh clone, pull), `make ui`
servers on non-default ports (Prefect UI settings, MLflow tracking server with an artifact store), a Prefect work
pool with a worker process, and a sweep through DVC's experiment queue.

Cheap stages only: `shard` plus the two probe stages of test_pipeline.py (probe_a also registers a tiny model).
"""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from components.io import free_port
from tests.conftest import commit_all, ctrl_c_reaches, interrupt_session, project_env, run_dvc, run_flows
from tests.e2e.test_pipeline import PROBES, add_probe_stages, locked_params, ran_stages

EXPERIMENT = "diffusion-distill"


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode("utf-8", "replace")


def outputs_fingerprint(root: Path) -> dict:
    """What a user compares after a pull: the metrics DVC shows and the stages' output files."""
    metrics = run_dvc(root, "metrics", "show", "--json")
    assert metrics.returncode == 0, metrics.stderr[-2000:]
    files = {str(p.relative_to(root)): p.read_bytes() for d in ("data/shards", "data/probe_a_out", "data/probe_b_out")
             for p in sorted((root / d).rglob("*")) if p.is_file()}
    return {"metrics": json.loads(metrics.stdout), "files": files}


# ---------------------------------------------------------------- 16.1 DVC remote

def test_push_then_fresh_clone_pulls_everything_and_reproduces_nothing(project):
    add_probe_stages(project)
    r = run_dvc(project, "repro", *PROBES)
    assert r.returncode == 0 and ran_stages(r.stdout) == {"shard", *PROBES}, r.stdout[-2000:] + r.stderr[-2000:]
    # the default remote (.dvc/config: ../../dvc-storage, beside the clone) does not exist yet: one line says so
    storage = (project.parent / "dvc-storage").resolve()
    r = run_flows(project, "remote")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"DVC remote 'storage' ({storage}) does not exist; mkdir -p {storage}" in r.stderr
    storage.mkdir()
    assert run_flows(project, "remote").returncode == 0
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    metrics = [str(p.relative_to(project)) for p in project.glob("data/*/metrics.json")]
    subprocess.run(["git", "add", "-f", *metrics], cwd=project, check=True)  # DVC metrics travel with git
    commit_all(project, "run")
    r = run_dvc(project, "push")
    assert r.returncode == 0, r.stderr[-2000:]
    before = outputs_fingerprint(project)

    # only the stages that ran have outputs (a full `dvc pull` would also ask for the never-run stages')
    for name, fetch in (("clone-pull", ["pull", "shard", *PROBES]), ("clone-repro-pull", None)):
        clone = project.parent / name
        subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
        if fetch is None:
            # nothing pulled: --allow-missing treats the missing outputs as present (nothing to run) ...
            r = run_dvc(clone, "repro", "--allow-missing", "--dry", *PROBES)
            assert r.returncode == 0 and ran_stages(r.stdout) == set(), r.stdout[-2000:] + r.stderr[-2000:]
            # ... and --pull fetches them from the remote instead of rerunning the stages
            r = run_dvc(clone, "repro", "--pull", *PROBES)
            assert r.returncode == 0 and ran_stages(r.stdout) == set(), r.stdout[-2000:] + r.stderr[-2000:]
        else:
            r = run_dvc(clone, *fetch)
            assert r.returncode == 0, r.stderr[-2000:]
        status = run_dvc(clone, "status", *PROBES)
        assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
        r = run_dvc(clone, "repro", *PROBES)
        assert r.returncode == 0 and ran_stages(r.stdout) == set(), r.stdout[-2000:]
        assert outputs_fingerprint(clone) == before


# ---------------------------------------------------------------- make ui: Prefect + MLflow servers

@pytest.fixture(scope="module")
def ui_servers(tmp_path_factory):
    """`scripts/ui.sh` (what `make ui` runs) in a project copy, on random ports, with the MLflow store and artifact
    store outside the project (so anything found there came through the server). Yields its URLs."""
    from tests.project_copy import copy_project

    base = tmp_path_factory.mktemp("ui")
    root = copy_project(base / "project")
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    ports = {"PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    env = project_env(**ports, SERVE="0", MLFLOW_BACKEND=f"sqlite:///{base / 'server-mlflow.db'}",
                      MLFLOW_ARTIFACTS=str(base / "server-artifacts"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(["bash", "scripts/ui.sh"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=ctrl_c_reaches)
    lines = []
    try:
        for line in proc.stdout:  # the URLs are printed once both servers answer
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        assert proc.poll() is None, "".join(lines)
        yield {"root": root, "base": base, "prefect": f"http://127.0.0.1:{ports['PREFECT_PORT']}",
               "mlflow": f"http://127.0.0.1:{ports['MLFLOW_PORT']}", "output": "".join(lines)}
    finally:
        interrupt_session(proc, 60)  # ui.sh's trap stops the servers
        # Ctrl-C of `make ui` must leave no server (or server child) behind; on a loaded machine a server's workers
        # may still be exiting when ui.sh returns, so give them a few seconds.
        deadline = time.time() + 30
        while _processes_under(root) and time.time() < deadline:
            time.sleep(0.5)
        left = {p.pid: _describe(p) for p in _processes_under(root)}
        for p in _processes_under(root):
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert not left, left


def _processes_under(root: Path) -> list:
    """Live (not zombie: already exited, waiting to be reaped) processes whose command line names `root`."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(root) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _describe(p) -> str:
    try:
        return " ".join(p.cmdline())[:200]
    except psutil.Error:
        return "(exited)"


def assert_ui_follows_server(base_url: str) -> None:
    """/ui-settings names this server's API, and the UI page and the scripts it loads are served."""
    status, body = http_get(f"{base_url}/ui-settings")
    assert status == 200 and json.loads(body)["api_url"] == f"{base_url}/api", body
    status, page = http_get(f"{base_url}/")
    assert status == 200 and "<html" in page.lower()
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', page)
    assert scripts, page[:2000]
    for src in scripts:
        assert http_get(base_url + src if src.startswith("/") else f"{base_url}/{src}")[0] == 200


def test_prefect_ui_works_off_the_default_port(ui_servers, prefect_api):
    assert not ui_servers["prefect"].endswith(":4200")
    assert_ui_follows_server(ui_servers["prefect"])  # make ui with PREFECT_PORT
    assert_ui_follows_server(prefect_api.removesuffix("/api"))  # the project-local server (random port)


def stage_env(servers: dict) -> dict:
    return {"PREFECT_API_URL": servers["prefect"] + "/api", "MLFLOW_TRACKING_URI": servers["mlflow"]}


def prefect_logs_of(api_url: str, flow_run_name: str) -> list[str]:
    """The log lines of the flow run with that name, through the REST API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))
        assert len(runs) == 1, [r.name for r in runs]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))
    return [log.message for log in logs]


def test_stages_log_through_the_mlflow_server_and_the_model_loads_elsewhere(ui_servers, tmp_path):
    from mlflow import MlflowClient

    from components.tracking.runs import lineage_chain

    root = ui_servers["root"]
    add_probe_stages(root)
    r = run_dvc(root, "repro", "probe_a", **stage_env(ui_servers))
    assert r.returncode == 0 and ran_stages(r.stdout) == {"shard", "probe_a"}, r.stdout[-2000:] + r.stderr[-2000:]
    # nothing went to a local store: runs are in the server's database, artifacts in its artifact store
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
    assert any((ui_servers["base"] / "server-artifacts").rglob("manifest.json"))
    client = MlflowClient(ui_servers["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    by_stage = {run.data.tags.get("stage"): run for run in runs if run.data.tags.get("stage")}
    parent = [run for run in runs if run.data.tags.get("pipeline") == "true"]
    # one parent run for the one `dvc repro`, both stage runs its children; the lineage link resolves via the server
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in by_stage.values()} == {parent[0].info.run_id}
    # each stage's Prefect flow run is named after the invocation and carries the stage's own output (shard's
    # progress bar goes to stderr, not through Prefect's logger)
    logs = prefect_logs_of(ui_servers["prefect"] + "/api", f"shard-{parent[0].info.run_name}")
    assert any(line.startswith("writing shards") for line in logs), logs
    chain = lineage_chain(by_stage["probe_a"].info.run_id, ui_servers["mlflow"])
    assert [link["stage"] for link in chain] == ["probe_a", "shard"] and not any(link["missing"] for link in chain)
    assert client.list_artifacts(by_stage["shard"].info.run_id)[0].path == "manifest.json"
    # the registered model loads in a fresh process, from another directory, through the server
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import mlflow.pytorch, torch; m = mlflow.pytorch.load_model('models:/diffusion-distill-probe_a@latest'); "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                       env={**project_env(), "MLFLOW_TRACKING_URI": ui_servers["mlflow"]})
    assert r.returncode == 0, r.stderr[-2000:]
    name, n_params = r.stdout.split()[-2:]
    assert int(n_params) > 0, r.stdout


# ---------------------------------------------------------------- 16.2 work pool + worker

def test_run_created_through_the_api_completes_on_a_pool_worker(ui_servers):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.tracking.runs import child_runs

    root, env = ui_servers["root"], stage_env(ui_servers)
    if not (root / "flows" / "probe.py").exists():
        add_probe_stages(root)
    # a worker for a pool nobody created: one line naming the pool, the server and the fix
    r = run_flows(root, "worker", "--pool", "no-such-pool", **env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"no work pool 'no-such-pool' on the Prefect server {ui_servers['prefect']}" in r.stderr
    assert "python -m flows deploy --pool no-such-pool" in r.stderr
    r = run_flows(root, "deploy", "--pool", "gpu", **env)
    assert r.returncode == 0 and "pipeline/gpu-probe_b" in r.stderr, r.stderr[-2000:]
    worker = subprocess.Popen([sys.executable, "-m", "flows", "worker", "--pool", "gpu"], cwd=root,
                              env=project_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, preexec_fn=ctrl_c_reaches)
    try:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                assert client.read_work_pool("gpu").concurrency_limit == 1
            flow_run = run_deployment("pipeline/gpu-probe_b", timeout=600, parameters={
                "overrides": ["shard.seed=5"], "run_name": "pool-seed-5"})
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.work_pool_name == "gpu" and flow_run.name == "pool-seed-5"
    finally:
        interrupt_session(worker, 30)
    # params.yaml, dvc.lock and MLflow agree on the override
    assert yaml.safe_load((root / "params.yaml").read_text())["shard"]["seed"] == 5
    for stage in ("shard", "probe_b"):
        assert locked_params(root, stage)["params.yaml"]["shard"]["seed"] == 5
    client = MlflowClient(ui_servers["mlflow"])
    parents = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                 filter_string="attributes.run_name = 'pool-seed-5'")
    assert len(parents) == 1 and parents[0].data.params["override.shard.seed"] == "5"
    assert parents[0].data.tags["prefect.flow_run_id"] == str(flow_run.id)
    children = {c["stage"]: c for c in child_runs(parents[0].info.run_id, EXPERIMENT, ui_servers["mlflow"])}
    assert set(children) == {"shard", "probe_b"}
    assert all(c["params"]["shard.seed"] == "5" and c["status"] == "FINISHED" for c in children.values())


# ---------------------------------------------------------------- 16.4 experiment queue

def test_queued_sweep_runs_each_experiment_in_isolation_and_tracks_it(project):
    from mlflow import MlflowClient

    add_probe_stages(project)
    env = {"PREFECT_API_URL": ""}  # the project-local server: queued runs must share the one in the home repo
    r = run_dvc(project, "repro", "probe_b", **env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    commit_all(project, "baseline")
    try:
        for seed in (3, 4):
            r = run_flows(project, "queue", "probe_b", "-S", f"shard.seed={seed}", "--name", f"seed-{seed}", **env)
            assert r.returncode == 0, r.stderr[-2000:]
        r = run_dvc(project, "queue", "start", "-j", "2", **env)
        assert r.returncode == 0, r.stderr[-2000:]
        deadline = time.time() + 600
        while time.time() < deadline:
            r = run_dvc(project, "queue", "status", **env)
            assert r.returncode == 0, r.stderr[-2000:]
            status = r.stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(5)
        assert status.count("Success") == 2, status + run_dvc(project, "queue", "logs", "seed-3").stdout[-3000:]
    finally:
        run_dvc(project, "queue", "stop", "--kill")
        run_flows(project, "server", "stop")
    shown = run_dvc(project, "exp", "show", "--json").stdout
    exps = {}
    for baseline in json.loads(shown):
        for experiment in baseline.get("experiments") or []:
            head = experiment["revs"][0]
            exps[head["name"]] = head["data"]["params"]["params.yaml"]["data"]
    assert {"seed-3", "seed-4"} <= set(exps), shown[:3000]
    assert [exps[f"seed-{seed}"]["shard"]["seed"] for seed in (3, 4)] == [3, 4]
    # one MLflow store (the home repo's), one parent run per experiment with its override, stages as children
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for seed in (3, 4):
        parents = client.search_runs([experiment_id], filter_string=f"attributes.run_name = 'seed-{seed}'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.params["override.shard.seed"] == str(seed)
        children = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
        assert sorted(c.data.tags["stage"] for c in children) == ["probe_b", "shard"]
        assert {c.data.params["shard.seed"] for c in children} == {str(seed)}
    # no Prefect server or MLflow store of their own inside the experiment workspaces
    assert not list((project / ".dvc" / "tmp").rglob("server.json"))
    assert not [p for p in (project / ".dvc" / "tmp").rglob("mlflow.db")]


def test_queue_refuses_untracked_files_in_one_line(project):
    (project / "note.txt").write_text("a file the queued copy would not have")
    r = run_flows(project, "queue", "-S", "shard.seed=9", "shard")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "untracked files would be left out of the queued experiment: note.txt" in r.stderr
    assert "Queued" not in run_dvc(project, "queue", "status").stdout
