"""Where a stage's Prefect flow run is recorded, decided before Prefect is imported.

- PREFECT_API_URL set (tests, `make ui`, a team server): use it; fail with one line if it does not answer.
- otherwise a project-local Prefect server (state in `.prefect/`, bound to 127.0.0.1) is started once in the
  background and reused by every later stage, so a stage pays ~0.5 s instead of the ~7 s of Prefect's
  temporary per-process server. `python -m flows server stop` (or `make stop`) stops it.
- PIPELINE_PREFECT=ephemeral: Prefect's own temporary server per process (slow, leaves nothing running).

Every server started here is told its own address as the UI's API URL (PREFECT_UI_API_URL), so the UI works on any
port. A stage running in a DVC experiment-queue workspace (`.dvc/tmp/exps/...`, a throwaway copy of the repo) uses
the state of the repo that queued it (`home_root`): one Prefect server, one MLflow store for every queued run.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from components.errors import UserError
from components.io import free_port

STATE_DIR = ".prefect"
STATE_FILE = "server.json"


def repo_root() -> Path:
    """The repo root: walk up from cwd to dvc.yaml (DVC runs a stage in its workspace: the repo, or for a queued
    experiment a copy under .dvc/tmp/exps/, where DVC_ROOT still names the original repo); else DVC_ROOT; else cwd."""
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "dvc.yaml").exists() or (p / ".dvc").is_dir():
            return p
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return here


EXP_WORKSPACE = (".dvc", "tmp", "exps")  # where `dvc exp run --queue` / `dvc queue start` run experiments


def home_root(root: Path) -> Path:
    """The repo that owns shared state (Prefect server, MLflow store): `root` itself, or for a DVC experiment
    workspace under <repo>/.dvc/tmp/exps/..., that <repo>."""
    parts = Path(root).resolve().parts
    for i in range(len(parts) - len(EXP_WORKSPACE)):
        if parts[i:i + len(EXP_WORKSPACE)] == EXP_WORKSPACE:
            return Path(*parts[:i])
    return Path(root).resolve()


def server_env(state_dir: Path, host: str, port: int, public_host: Optional[str] = None) -> dict[str, str]:
    """Environment for `prefect server start`: its own home, and the UI pointed at this server's API (Prefect
    otherwise tells the UI http://127.0.0.1:4200/api whatever port the server listens on)."""
    env = {**os.environ, "PREFECT_HOME": str(state_dir), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_API_URL": f"http://{public_host or host}:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    return env


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def configure_prefect(root: Path) -> str:
    """Point this process (and its children) at a Prefect API; returns a short description."""
    root = home_root(root)
    os.environ.setdefault("PREFECT_HOME", str(root / STATE_DIR))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not api_healthy(url):
            raise UserError(f"Prefect server not reachable at {url} (PREFECT_API_URL); start one with `make ui` "
                            "or unset PREFECT_API_URL to use the project-local server")
        return url
    if os.environ.get("PIPELINE_PREFECT") == "ephemeral":
        return "ephemeral"
    url = ensure_local_server(root)
    os.environ["PREFECT_API_URL"] = url
    return url


def _state_path(root: Path) -> Path:
    return root / STATE_DIR / STATE_FILE


def local_server_url(root: Path) -> str | None:
    """URL of the project-local server if it is up."""
    path = _state_path(root)
    if not path.exists():
        return None
    with contextlib.suppress(ValueError, OSError):
        state = json.loads(path.read_text())
        if api_healthy(state["api_url"], timeout=1.0):
            return state["api_url"]
    return None


def ensure_local_server(root: Path, port: int | None = None, timeout: float = 120.0) -> str:
    """Start the project-local Prefect server unless it already runs; a file lock stops two starters racing."""
    state_dir = root / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        url = local_server_url(root)
        if url:
            return url
        port = port or free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        env = server_env(state_dir, "127.0.0.1", port)
        log = open(state_dir / "server.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            cwd=state_dir)  # not the caller's cwd: a queued experiment's workspace is deleted when it ends
        print(f"Starting a local Prefect server (UI http://127.0.0.1:{port}, log {state_dir / 'server.log'}); "
              "it keeps running for later stages, stop it with `make stop`", file=sys.stderr)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise UserError(f"the local Prefect server exited (code {proc.returncode}); see {state_dir / 'server.log'}")
            if api_healthy(api_url, timeout=1.0):
                _state_path(root).write_text(json.dumps({"api_url": api_url, "pid": proc.pid, "port": port}))
                return api_url
            time.sleep(0.5)
        proc.terminate()
        raise UserError(f"the local Prefect server did not answer at {api_url} within {timeout:.0f} s; "
                        f"see {state_dir / 'server.log'}")


def stop_local_server(root: Path) -> bool:
    path = _state_path(root)
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(state["pid"], signal.SIGTERM)
    path.unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------- a stage process started by DVC

def use_home_tracking_store(root: Path, configured_uri: Optional[str]) -> None:
    """In a DVC experiment workspace, log to the home repo's MLflow store (the workspace copy, and its mlflow.db,
    is deleted when the experiment ends). An explicit MLFLOW_TRACKING_URI or tracking.uri is left alone."""
    home = home_root(root)
    if home != Path(root).resolve() and not configured_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(home / 'mlflow.db').as_posix()}"


def _is_dvc_command(cmdline: list[str]) -> bool:
    words = [Path(word).name for word in cmdline[:3]]
    return bool(words) and (words[0] == "dvc" or (len(words) > 1 and words[1] == "dvc")
                            or (len(words) > 2 and words[1] == "-m" and words[2] in ("dvc", "dvc.cli")))


def dvc_invocation() -> Optional[str]:
    """`<pid>-<start time>` of the `dvc` process that started this stage (the nearest `dvc` ancestor), or None
    when DVC did not start it. Stages of one `dvc repro` share it; two invocations never do."""
    if not os.environ.get("DVC_STAGE"):
        return None
    import psutil

    with contextlib.suppress(psutil.Error):
        process = psutil.Process().parent()
        while process is not None:
            if _is_dvc_command(process.cmdline()):
                return f"{process.pid}-{int(process.create_time())}"
            process = process.parent()
    return None


class _PrefectTee:
    """A text stream that writes through and sends each complete line (tqdm's carriage-return redraws
    included) to the current Prefect flow run's log, so the UI shows a stage's output and progress."""

    def __init__(self, stream, logger):
        self._stream, self._logger, self._pending, self._busy = stream, logger, "", False

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if self._busy:
            return written
        self._busy = True
        try:
            self._pending += text
            *lines, self._pending = self._pending.replace("\r", "\n").split("\n")
            lines = [line.strip() for line in lines if line.strip()]
            if lines:
                from prefect.context import FlowRunContext

                if FlowRunContext.get() is not None:
                    for line in lines:
                        self._logger.info(line)
        finally:
            self._busy = False
        return written

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_to_prefect() -> "contextlib.AbstractContextManager[None]":
    """Inside the block, stdout and stderr lines also go to the Prefect flow run's log (API only: the console
    already shows them)."""
    import logging

    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("flows.stage_output")
    logger.propagate, logger.level = False, logging.INFO
    if not logger.handlers:
        logger.addHandler(APILogHandler())
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PrefectTee(sys.stdout, logger), _PrefectTee(sys.stderr, logger)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
