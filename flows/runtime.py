"""Where a stage's Prefect flow run is recorded, decided before Prefect is imported.

- PREFECT_API_URL set (tests, `make ui`, a team server): use it; fail with one line if it does not answer.
- otherwise a project-local Prefect server (state in `.prefect/`, bound to 127.0.0.1) is started once in the
  background and reused by every later stage, so a stage pays ~0.5 s instead of the ~7 s of Prefect's
  temporary per-process server. `python -m flows server stop` (or `make stop`) stops it.
- PIPELINE_PREFECT=ephemeral: Prefect's own temporary server per process (slow, leaves nothing running).
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

from components.errors import UserError
from components.io import free_port

STATE_DIR = ".prefect"
STATE_FILE = "server.json"


def repo_root() -> Path:
    """The repo root: DVC sets DVC_ROOT for stage commands; otherwise walk up from cwd to dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "dvc.yaml").exists() or (p / ".dvc").is_dir():
            return p
    return here


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def configure_prefect(root: Path) -> str:
    """Point this process (and its children) at a Prefect API; returns a short description."""
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
        env = {**os.environ, "PREFECT_HOME": str(state_dir), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        log = open(state_dir / "server.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
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
