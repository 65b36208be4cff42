"""Reliability on real processes (README "Reliability"): kill -9 of a stage under `dvc repro`, kill -9 of `dvc`
itself, a second writer, a truncated shard, a Prefect server lost mid-stage, hostile params, a read-only data/,
checkpoint clean-up. Every process here is real (DVC, Prefect server, MLflow sqlite store, DeepSpeed trainer).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.io import verify_file_records
from tests.conftest import commit_all, project_env, run_dvc, run_flows, set_params

TINY = {"data": {"n_samples": 600}, "shard": {"samples_per_shard": 100},
        "model": {"mlp": {"width": 32, "depth": 2}},
        "teacher": {"steps": 40, "batch_size": 64, "checkpoint_every": 20, "log_every": 10, "plot_samples": 100,
                    "warmup_steps": 5}}
LONG = {"teacher": {"steps": 1_000_000}}  # runs until killed (same checkpoint fingerprint: steps is not in it)


def lock_record(root: Path, stage: str = "teacher") -> dict:
    path = root / "checkpoints/.locks" / f"{stage}.lock"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def start(root: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=root, env=project_env(**env), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_running_stage(root: Path, proc: subprocess.Popen, old_pid=None, timeout: float = 300) -> dict:
    """The lock record of a stage process (not `old_pid`) that has opened its MLflow run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rec = lock_record(root)
        if rec.get("pid") not in (None, old_pid) and rec.get("mlflow_run_id") and not rec.get("outcome"):
            return rec
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.3)
    raise AssertionError("the stage did not start")


def wait_dead(pid: int, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.2)
    return False


def run_states(rec: dict) -> tuple[str, str, str | None]:
    """(MLflow status, Prefect state type, MLflow `stage.ended_by` tag) of a lock record's runs."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    run = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"])
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(rec["prefect_flow_run_id"]).state
    return run.info.status, state.type.value, run.data.tags.get("stage.ended_by")


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if line.startswith("error: ")][-1]


def test_kill_9_keeps_the_output_and_the_next_run_closes_the_killed_runs(project):
    """Items 1, 5, 6: a second writer is refused naming the holder; kill -9 of `dvc` stops its stage; kill -9 of
    the stage under `dvc repro` keeps the previous output (persist + atomic rename) and leaves its runs RUNNING
    until the next run of the stage marks them FAILED / Crashed."""
    set_params(project, TINY)
    commit_all(project, "tiny")
    r = run_dvc(project, "repro", "teacher")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    commit_all(project, "repro")
    output = project / "models/teacher"
    files = json.loads((output / "manifest.json").read_text())["files"]
    metrics = (project / "data/teacher/metrics.json").read_text()
    finished = lock_record(project)
    set_params(project, LONG)

    # A second writer is refused with one line naming the holder; killing dvc stops the stage it started.
    # dvc runs the cmd through $SHELL; /bin/sh (dash, CI's case when SHELL is unset) stays between dvc and the stage.
    dvc = start(project, "dvc", "repro", "teacher", SHELL="/bin/sh")
    rec = wait_for_running_stage(project, dvc, old_pid=finished["pid"])
    second = run_flows(project, "teacher")
    assert f"stage 'teacher' is already running: pid {rec['pid']} on " in one_error_line(second)
    os.kill(dvc.pid, signal.SIGKILL)
    dvc.wait()
    assert wait_dead(rec["pid"]), "the stage outlived the dvc process that started it"
    assert run_states(rec)[:2] == ("FAILED", "CRASHED")  # SIGTERM from the parent watchdog

    # kill -9 of the stage itself: the previous output stays, intact and as dvc.lock records it.
    dvc = start(project, "dvc", "repro", "teacher")
    killed = wait_for_running_stage(project, dvc, old_pid=rec["pid"])
    os.kill(killed["pid"], signal.SIGKILL)
    assert dvc.wait(timeout=120) != 0
    assert verify_file_records(output, files) is None
    assert (project / "data/teacher/metrics.json").read_text() == metrics
    status = json.loads(run_dvc(project, "status", "teacher", "--json").stdout)
    changed_outs = {k for entry in status.get("teacher", []) if isinstance(entry, dict)
                    for k in entry.get("changed outs", {})}
    assert not changed_outs & {"models/teacher", "data/teacher/metrics.json"}, status  # only params changed
    assert run_states(killed)[:2] == ("RUNNING", "RUNNING")  # nobody could close them
    from mlflow import MlflowClient

    tracking = MlflowClient(killed["tracking_uri"])
    invocation = tracking.get_run(killed["mlflow_run_id"]).data.tags["mlflow.parentRunId"]  # the dvc repro's run
    assert tracking.get_run(invocation).info.status == "RUNNING"

    # The next run of the stage (here one that fails on a params mistake) closes them.
    set_params(project, {"model": {"kind": "unet"}})
    nxt = run_flows(project, "teacher")
    assert "needs square images" in one_error_line(nxt)
    assert f"the previous 'teacher' run (pid {killed['pid']} on" in nxt.stderr and "was killed" in nxt.stderr
    status, prefect_state, note = run_states(killed)
    assert (status, prefect_state) == ("FAILED", "CRASHED") and "died without closing this run" in note
    assert tracking.get_run(invocation).info.status == "FAILED"


def test_a_truncated_input_is_one_line_and_records_nothing(taught_project):
    """Item 3: inputs are checked against the file list in their manifest before any run is opened."""
    from mlflow import MlflowClient

    shard = taught_project / "data/shards/train-000000.tar"
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    client = MlflowClient(f"sqlite:///{taught_project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs_before = len(client.search_runs(experiments))
    started = time.time()
    r = run_flows(taught_project, "teacher")
    line = one_error_line(r)
    print(f"truncated shard refused in {time.time() - started:.1f} s (whole CLI, loaded machine)")
    assert f"{shard} has {len(intact) // 2} bytes, its manifest says {len(intact)}" in line
    assert "dvc checkout --force data/shards" in line
    assert len(client.search_runs(experiments)) == runs_before


def test_clean_checkpoints_keeps_what_outputs_need(taught_project):
    """Item 8: old fingerprint directories go; the current output's own and the newest per stage stay."""
    current = json.loads((taught_project / "models/teacher/manifest.json").read_text())["checkpoint_dir"]
    old = taught_project / "checkpoints/teacher/0123456789ab/step00000010"
    old.mkdir(parents=True)
    (old / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 300_000)
    past = time.time() - 86400
    for p in (old / "mp_rank_00_model_states.pt", old, old.parent):
        os.utime(p, (past, past))
    dry = run_flows(taught_project, "clean-checkpoints", "--dry-run")
    assert "would remove checkpoints/teacher/0123456789ab (0.3 MB)" in dry.stdout and old.exists()
    r = run_flows(taught_project, "clean-checkpoints")
    assert r.returncode == 0 and "removed 1 checkpoint directory, 0.3 MB" in r.stdout
    assert not old.parent.exists() and (taught_project / current).is_dir()


def test_losing_the_prefect_server_after_the_work_does_not_fail_the_stage(taught_project, tmp_path):
    """Item 9: kill -9 of the Prefect server while the stage trains: exit 0, outputs and metrics written, the
    MLflow run FINISHED; the flow run is closed by the next run of the stage."""
    from mlflow import MlflowClient

    from flows.runtime import ensure_local_server, stop_local_server

    home = tmp_path / "prefect"
    url = ensure_local_server(home)
    try:
        # resumes at 400: ~3000 steps of work, so the server dies while the stage trains even on a fast machine
        set_params(taught_project, {"teacher": {"steps": 3400}})
        before = lock_record(taught_project).get("pid")
        stage = start(taught_project, "flows", "teacher", PREFECT_API_URL=url)
        rec = wait_for_running_stage(taught_project, stage, old_pid=before)
        os.killpg(json.loads((home / ".prefect/server.json").read_text())["pid"], signal.SIGKILL)
        code, err = stage.wait(timeout=600), stage.stderr.read()
        assert code == 0 and "completed, but the Prefect server" in err and "Traceback" not in err, err[-3000:]
        metrics = json.loads((taught_project / "data/teacher/metrics.json").read_text())
        assert metrics["steps"] == 3400
        assert json.loads((taught_project / "data/teacher/run.json").read_text())["mlflow_run_id"] == rec["mlflow_run_id"]
        assert MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).info.status == "FINISHED"
        assert lock_record(taught_project)["outcome"] == "completed"  # read by the next run to close the flow run
    finally:
        stop_local_server(home)


@pytest.mark.parametrize("params_text, needle", [
    ("teacher:\n  lr: .inf\n", "teacher.lr = inf: Input should be a finite number"),
    ("teacher:\n  lr: 0.1\nshard:\n  seed: 1\nteacher:\n  steps: 3\n", "duplicate key 'teacher' (line 5; first at line 1)"),
])
def test_hostile_params_are_one_line(tmp_path, params_text, needle):
    """Item 11: non-finite floats and duplicate keys are refused by check-params (and so by every stage)."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(params_text)
    r = subprocess.run([sys.executable, "-m", "flows", "check-params"], cwd=tmp_path, capture_output=True, text=True,
                       env=project_env(PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert needle in one_error_line(r)


def test_read_only_data_dir_is_one_line(project):
    """Item 11: an unwritable data/ stops the stage before any work, with one line naming the directory."""
    data = project / "data"
    root = os.geteuid() == 0  # root ignores permission bits: make the directory immutable instead
    lock = ["chattr", "+i", str(data)] if root else ["chmod", "a-w", str(data)]
    unlock = ["chattr", "-i", str(data)] if root else ["chmod", "u+w", str(data)]
    subprocess.run(lock, check=True)
    try:
        r = run_flows(project, "shard")
    finally:
        subprocess.run(unlock, check=True)
    assert f"stage 'shard' cannot write to {data}" in one_error_line(r)
    assert not (data / "shards").exists()


def test_a_killed_run_on_a_tracking_server_that_has_gone_does_not_stall_the_next_run(project):
    """The previous holder of the stage lock logged to an MLflow server that no longer runs: the next run warns that
    it could not close that run and goes on (a health check, not minutes of HTTP retries)."""
    from components.io import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    locks = project / "checkpoints/.locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "selfcheck.lock").write_text(json.dumps({
        "pid": 999_999_999, "host": os.uname().nodename, "started_unix": time.time() - 60, "stage": "selfcheck",
        "tracking_uri": dead, "mlflow_run_id": "0" * 32}))
    # The bound only stops a regression from hanging the suite; MLflow's own retries would take minutes.
    r = subprocess.run([sys.executable, "-m", "flows", "selfcheck"], cwd=project, env=project_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"could not close the previous 'selfcheck' MLflow run {'0' * 32}: MLflow server not reachable at {dead}" \
        in r.stderr
