"""Fixed cost of one stage, and where it goes.

1. `python -m flows selfcheck`: the stage contract with an empty body (process start, imports, params validation,
   Prefect flow run on an already running server, MLflow run with tags/params/manifest artifact, atomic output),
   with the default local sqlite store and, interleaved, through an MLflow tracking server (`mlflow server`, as on
   a cluster): the sqlite store costs each stage process its SQLAlchemy/alembic imports (~1 CPU-s).
2. The import cost of each stage's flow module (`python -c "import flows.<stage>"`): what a stage pays before its
   body runs, on top of the contract (torch, plotting, ...).
3. A breakdown of the start-up pieces, each in a fresh process: python, params schema (pydantic), Prefect, MLflow,
   the MLflow sqlite store (engine + schema check), torch, deepspeed, matplotlib.

Every figure is wall seconds and CPU seconds (user + system of the child process), median and [min, max] over
--runs fresh processes. On a shared, loaded machine wall time mostly measures the neighbours; CPU seconds are
what the stage itself costs (on an idle 2-core machine wall ~ CPU + the Prefect server's share + I/O).
`--before DIR` measures another checkout (e.g. `git worktree add /tmp/before <commit>`) in the same run,
interleaved with this one, against the same Prefect server, so before/after are a ratio taken in one run.

    python benchmarks/bench_stage_overhead.py [--runs 5] [--before DIR] [--stages shard teacher ...]

Writes benchmarks/results/stage_overhead.json.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from components.io import free_port, write_json  # noqa: E402
from flows import STAGES  # noqa: E402
from flows.runtime import configure_prefect, repo_root  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STORE_STARTUP = ("import os, mlflow; from mlflow import MlflowClient; "
                 "MlflowClient(f'sqlite:///{os.getcwd()}/mlflow.db').search_experiments()")
# Cumulative steps: each row's own cost is its figure minus the previous row's.
PIECES = (("python", "pass"),
          ("params schema (pydantic, yaml)", "import components.config"),
          ("+ prefect", "import components.config, prefect"),
          ("+ mlflow (with pandas)", "import components.config, prefect, mlflow"),
          ("+ mlflow sqlite store start-up", "import components.config, prefect; " + STORE_STARTUP))
SEPARATE = (("torch", "import torch"), ("deepspeed (with torch)", "import deepspeed"),
            ("matplotlib (Agg figure)", "import matplotlib.figure, matplotlib.backends.backend_agg"))


def measure(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} (in {cwd}) failed:\n{r.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary(samples: list[tuple[float, float]]) -> dict:
    out = {}
    for i, key in enumerate(("wall", "cpu")):
        values = [s[i] for s in samples]
        out[key] = {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                    "max": round(max(values), 3)}
    return out


def fmt(s: dict) -> str:
    return (f"CPU {s['cpu']['median']:5.2f} s [{s['cpu']['min']:.2f}, {s['cpu']['max']:.2f}]  "
            f"wall {s['wall']['median']:5.2f} s [{s['wall']['min']:.2f}, {s['wall']['max']:.2f}]")


def start_mlflow_server(workdir: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store and artifact root; returns (process, uri)."""
    import urllib.request

    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    # As `make ui` runs it: one server process (MLflow's default 4 get restarted on a loaded machine, dropping
    # requests that the client then retries with backoff) and no GenAI job runner.
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                             "--artifacts-destination", str(workdir / "artifacts")],
                            env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited with {proc.returncode}")
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("mlflow server did not answer /health within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", type=Path, default=None, help="another checkout to measure in the same run")
    ap.add_argument("--stages", nargs="*", default=list(STAGES), help="stage modules whose import to time")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-piece breakdown")
    args = ap.parse_args()
    root = repo_root()
    configure_prefect(root)  # start (once) the project-local server, as the first stage of a pipeline would
    env = {**os.environ, "DVC_NO_ANALYTICS": "true", "PYTHONPATH": ""}
    py = sys.executable
    checkouts = {"after": root, **({"before": args.before.resolve()} if args.before else {})}
    load_start = os.getloadavg()

    import tempfile

    server_dir = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    server, server_uri = start_mlflow_server(server_dir, env)
    variants = {**{name: (where, env) for name, where in checkouts.items()},
                "after, MLflow server": (root, {**env, "MLFLOW_TRACKING_URI": server_uri})}
    selfcheck = {name: [] for name in variants}
    try:
        measure([py, "-m", "flows", "selfcheck"], root, variants["after, MLflow server"][1])  # server warm-up
        for _ in range(args.runs):
            for name, (where, run_env) in variants.items():
                selfcheck[name].append(measure([py, "-m", "flows", "selfcheck"], where, run_env))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    stage_imports = {name: {stage: [] for stage in args.stages} for name in checkouts}
    for _ in range(max(2, args.runs // 2)):
        for stage in args.stages:
            for name, where in checkouts.items():
                stage_imports[name][stage].append(measure([py, "-c", f"import flows.{stage}"], where, env))
    breakdown = {}
    if not args.no_breakdown:
        for label, stmt in PIECES + SEPARATE:
            breakdown[label] = summary([measure([py, "-c", stmt], root, env) for _ in range(3)])

    result = {"selfcheck": {k: summary(v) for k, v in selfcheck.items()},
              "stage_import": {k: {s: summary(v) for s, v in d.items()} for k, d in stage_imports.items()},
              "breakdown": breakdown, "runs": args.runs, "checkouts": {k: str(v) for k, v in checkouts.items()},
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "command": "python benchmarks/bench_stage_overhead.py " + " ".join(sys.argv[1:])}
    for name in variants:
        print(f"selfcheck ({name}): {fmt(result['selfcheck'][name])}")
    for stage in args.stages:
        print(f"import flows.{stage:12s} " + "  |  ".join(
            f"{name}: {fmt(result['stage_import'][name][stage])}" for name in checkouts))
    for label, s in breakdown.items():
        print(f"{label:32s} {fmt(s)}")
    print(f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "stage_overhead.json", result)


if __name__ == "__main__":
    main()
