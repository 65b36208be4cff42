"""`python -m flows serve`: the pipeline flow served as Prefect deployments from this process.

Deployments (flow `pipeline`):
- `pipeline/all`: the whole DAG (parameters editable in the UI: targets, force, overrides, run_name);
- `pipeline/<stage>` for each stage of dvc.yaml: the same flow with targets=[<stage>] (its upstream stages
  are reproduced first when stale, as `dvc repro <stage>` would).
A run triggered from the UI (or `prefect deployment run`, or the API) executes in a subprocess of this process,
in the repo root. Runs stop being picked up when this process stops (Ctrl-C).
"""
from __future__ import annotations

import os
import sys

from components.config import load_params
from components.tracking.lineage import resolve_tracking_uri
from components.tracking.registry import check_tracking_server
from flows.runtime import configure_prefect, repo_root

ALL_DEPLOYMENT = "all"


def build_deployments(stages: list[str]) -> list:
    """RunnerDeployments for the pipeline (`all`) and one per stage (targets=[stage])."""
    from flows.pipeline import pipeline

    deployments = [pipeline.to_deployment(name=ALL_DEPLOYMENT, description="the whole DAG (dvc repro)",
                                          tags=["pipeline"])]
    for stage in stages:
        deployments.append(pipeline.to_deployment(
            name=stage, parameters={"targets": [stage]}, tags=["pipeline", "stage"],
            description=f"stage '{stage}' (and any stale upstream stage) via dvc repro"))
    return deployments


def serve_command() -> int:
    from prefect import serve

    from flows.pipeline import dvc_stages

    root = repo_root()
    os.chdir(root)  # served runs execute in this directory: the repo root, where dvc.yaml lives
    params = load_params(root / "params.yaml")
    check_tracking_server(resolve_tracking_uri(root, params.tracking.uri))
    api = configure_prefect(root)
    stages = dvc_stages(root)[0]
    deployments = build_deployments(stages)
    ui = api.removesuffix("/api") if api.startswith("http") else api
    print(f"serving deployments {', '.join('pipeline/' + d.name for d in deployments)} (Prefect UI {ui}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    serve(*deployments, print_starting_message=False, pause_on_shutdown=False)
    return 0
