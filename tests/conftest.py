"""Shared fixtures: a real Prefect server for the session, and temp copies of the project as git+DVC repos.

Nothing here mocks DVC, Prefect or MLflow: stage tests run `python -m flows ...` and `dvc repro` as a user
would, against a Prefect server on 127.0.0.1 and an MLflow sqlite store inside the temp project.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.project_copy import REPO, copy_project  # noqa: F401  (re-exported for tests)
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A Prefect server started for this test session (its own PREFECT_HOME), exported as PREFECT_API_URL."""
    from flows.runtime import ensure_local_server, stop_local_server

    root = tmp_path_factory.mktemp("prefect-home")
    url = ensure_local_server(root)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    yield url
    stop_local_server(root)
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous


def project_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses in a temp project: the venv first on PATH, no inherited MLflow URI."""
    # Rendezvous variables set in this pytest process by in-process Trainer tests (whose TCPStore still listens
    # on MASTER_PORT) must not leak into stage subprocesses: they would all try to bind that same port.
    dropped = {"MLFLOW_TRACKING_URI", "DVC_ROOT", "PIPELINE_PARENT_RUN_ID",
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "true"
    env["PYTHONPATH"] = ""  # the project dir itself is the cwd
    env.update(extra)
    return env


@pytest.fixture
def project(tmp_path, prefect_api) -> Path:
    """A temp copy of the repo (git + DVC initialised), with tiny data params for speed."""
    root = copy_project(tmp_path / "project")
    set_params(root, {"data": {"n_samples": 600}, "shard": {"samples_per_shard": 100}})
    commit_all(root, "tiny params")
    return root


# The tiny teacher every student-stage test starts from: well-separated modes (eight_gaussians) a small MLP learns
# in a few hundred steps, so "the student beats the teacher at one step" is measurable in seconds.
TINY_TEACHER_PARAMS = {
    "data": {"n_samples": 3000, "name": "eight_gaussians"},
    "model": {"mlp": {"width": 64, "depth": 2}},
    "teacher": {"steps": 400, "batch_size": 256, "checkpoint_every": 200, "log_every": 50, "plot_samples": 200,
                "warmup_steps": 20, "lr": 0.003},
}


@pytest.fixture(scope="session")
def taught_template(tmp_path_factory, prefect_api) -> Path:
    """A project where `python -m flows shard` and `python -m flows teacher` ran once for the whole session."""
    root = copy_project(tmp_path_factory.mktemp("taught") / "project")
    set_params(root, TINY_TEACHER_PARAMS)
    commit_all(root, "tiny teacher params")
    for stage in ("shard", "teacher"):
        r = run_flows(root, stage)
        assert r.returncode == 0, (stage, r.stderr[-3000:])
    return root


@pytest.fixture
def taught_project(taught_template, tmp_path) -> Path:
    """A private copy of the trained-teacher project (shards, teacher, its MLflow runs, git history)."""
    dest = tmp_path / "project"
    shutil.copytree(taught_template, dest, symlinks=True)
    return dest


def run_record(root: Path, stage: str) -> dict:
    """The stage's run record (data/<stage>/run.json): its MLflow run, commit, digests, child runs."""
    import json

    return json.loads((root / "data" / stage / "run.json").read_text())


def set_params(root: Path, updates: dict) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in updates.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def commit_all(root: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], cwd=root,
                   check=True, capture_output=True)


def run_cmd(root: Path, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=root, env=project_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def run_flows(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run_cmd(root, sys.executable, "-m", "flows", *args, **env)


def run_dvc(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run_cmd(root, sys.executable, "-m", "dvc", *args, **env)


def count_samples_with_plain_tar(shard_dir, split: str) -> int:
    """Samples in a split counted with nothing but tarfile + numpy (each record holds a block of samples)."""
    import io
    import tarfile

    import numpy as np

    n = 0
    for f in sorted(Path(shard_dir).glob(f"{split}-*.tar")):
        with tarfile.open(f) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".x.npy"):
                    n += len(np.load(io.BytesIO(tar.extractfile(m).read())))
    return n


def ctrl_c_reaches() -> None:
    """preexec_fn for a process that a test stops with Ctrl-C (interrupt_session): SIGINT at its default. A test run
    started as a background job inherits SIGINT ignored, and neither bash (`trap`) nor Python (KeyboardInterrupt)
    can catch a signal ignored at start; a terminal's Ctrl-C reaches a shell whose SIGINT is at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_session(proc: subprocess.Popen, timeout: float) -> None:
    """Ctrl-C for a process started with start_new_session=True (its whole group), SIGKILL after `timeout` s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
