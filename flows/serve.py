"""The pipeline flow as Prefect deployments: served from this process, or on a work pool that workers pull from.

`python -m flows serve` (what `make ui` runs): deployments executed as subprocesses of this process, in the repo
root, for as long as it runs (Ctrl-C stops it):
- `pipeline/all`: the whole DAG (parameters editable in the UI: targets, force, overrides, run_name);
- `pipeline/<stage>` for each stage of dvc.yaml: the same flow with targets=[<stage>] (its upstream stages
  are reproduced first when stale, as `dvc repro <stage>` would).

`python -m flows deploy --pool NAME` (run in the clone that should execute the runs, usually the GPU machine):
the same deployments, named `pipeline/<pool>-all` and `pipeline/<pool>-<stage>`, on the work pool NAME (a
`process` pool, created when missing, with a concurrency limit: 1 by default, so one GPU trains one thing at a
time). Their runs execute wherever `python -m flows worker --pool NAME` (or `prefect worker start --pool NAME`)
runs, in this clone's directory (the `working_dir` job variable). The pipeline lock and DVC's repo lock keep two
runs in one clone from interleaving anyway; the pool limit keeps them queued in Prefect instead of waiting.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from components.errors import UserError
from flows.runtime import configure_prefect, repo_root

ALL_DEPLOYMENT = "all"
DEFAULT_POOL = "pipeline"
DEFAULT_POOL_CONCURRENCY = 1


class WorkPoolMissing(UserError):
    """A worker asked for a work pool the Prefect server does not have."""


def build_deployments(stages: list[str], prefix: str = "", **options: Any) -> list:
    """RunnerDeployments for the pipeline (`<prefix>all`) and one per stage (`<prefix><stage>`, targets=[stage]);
    `options` go to `to_deployment` (work_pool_name, job_variables)."""
    from flows.pipeline import pipeline

    deployments = [pipeline.to_deployment(name=f"{prefix}{ALL_DEPLOYMENT}", description="the whole DAG (dvc repro)",
                                          tags=["pipeline"], **options)]
    for stage in stages:
        deployments.append(pipeline.to_deployment(
            name=f"{prefix}{stage}", parameters={"targets": [stage]}, tags=["pipeline", "stage"],
            description=f"stage '{stage}' (and any stale upstream stage) via dvc repro", **options))
    return deployments


def _prepare(root: Path) -> tuple[str, list[str]]:
    """Checks shared by serve and deploy (DAG, params, MLflow server, Prefect server); (Prefect API, stages)."""
    from flows.pipeline import check_request

    os.chdir(root)  # runs execute in this directory: the repo root, where dvc.yaml lives
    stages = check_request(root, None, None)[0]
    return configure_prefect(root), stages


def ui_url(api: str) -> str:
    return api.removesuffix("/api") if api.startswith("http") else api


def serve_command() -> int:
    from prefect import serve

    api, stages = _prepare(repo_root())
    deployments = build_deployments(stages)
    print(f"serving deployments {', '.join('pipeline/' + d.name for d in deployments)} (Prefect UI {ui_url(api)}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    serve(*deployments, print_starting_message=False, pause_on_shutdown=False)
    return 0


# ---------------------------------------------------------------- work pools

def read_work_pool(pool: str):
    """The work pool named `pool` on the configured server, or None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool)
        except ObjectNotFound:
            return None


def ensure_work_pool(pool: str, concurrency_limit: Optional[int]) -> Any:
    """Create the `process` work pool `pool` (concurrency_limit, default 1) or set the limit of an existing one
    when one is given. Returns the pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.workers.process import ProcessWorker

    existing = read_work_pool(pool)
    with get_client(sync_client=True) as client:
        if existing is None:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type=ProcessWorker.type, base_job_template=ProcessWorker.get_default_base_job_template(),
                concurrency_limit=DEFAULT_POOL_CONCURRENCY if concurrency_limit is None else concurrency_limit,
                description="diffusion-distill pipeline runs (python -m flows deploy)"))
        elif concurrency_limit is not None:
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=concurrency_limit))
    return read_work_pool(pool)


def deploy_command(pool: str, concurrency_limit: Optional[int]) -> int:
    root = repo_root()
    api, stages = _prepare(root)
    work_pool = ensure_work_pool(pool, concurrency_limit)
    deployments = build_deployments(stages, prefix=f"{pool}-", work_pool_name=pool,
                                    job_variables={"working_dir": str(root)})
    for deployment in deployments:
        deployment.apply(work_pool_name=pool)
    names = ", ".join(f"pipeline/{d.name}" for d in deployments)
    print(f"deployed {names} on work pool '{pool}' ({work_pool.type}, concurrency limit "
          f"{work_pool.concurrency_limit}; runs execute in {root}); Prefect UI {ui_url(api)}\n"
          f"start a worker here: python -m flows worker --pool {pool}", file=sys.stderr)
    return 0


def worker_command(pool: str) -> int:
    """`prefect worker start --pool POOL` in the repo root, after checking the pool exists (Prefect would create
    an empty one silently, and the worker would wait forever for runs nobody can deploy to it)."""
    root = repo_root()
    os.chdir(root)
    api = configure_prefect(root)
    if read_work_pool(pool) is None:
        raise WorkPoolMissing(f"no work pool '{pool}' on the Prefect server {ui_url(api)}; create it with its "
                              f"deployments first: python -m flows deploy --pool {pool}")
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    print(f"worker for pool '{pool}' on {ui_url(api)}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    os.execv(sys.executable, command)
