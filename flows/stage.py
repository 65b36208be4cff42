"""The Prefect side of the stage contract (components/tracking/stage.py): a stage flow is
`run_stage_in_flow(SPEC, body)` inside a Prefect @flow."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional, Union

from components.config import Params, load_params
from components.errors import DataError, UserError
from components.tracking.stage import StageContext, StageSpec, run_stage, warn  # the stage flows import these here
from flows.runtime import api_healthy, repo_root

COMPLETED: set[str] = set()  # stages whose run_stage returned in this process (the CLI ignores a later Prefect outage)
EXIT_IF_PREFECT_LOST = False  # set by the CLI (`python -m flows <stage>`), whose process ends with the stage
SpecResolver = Callable[[Path, Params], StageSpec]  # (repo, params) -> spec: a stage whose inputs depend on params


def run_stage_in_flow(spec: Union[StageSpec, SpecResolver], body: Callable[[StageContext], Optional[dict]]):
    """Call from inside a Prefect @flow: user errors become a Failed state with a one-line message
    (shown in the UI and printed by the CLI without a traceback); bugs propagate with their traceback."""
    from prefect import get_run_logger
    from prefect.runtime import flow_run
    from prefect.states import Failed

    repo = repo_root()
    name = spec.name if isinstance(spec, StageSpec) else None
    try:
        params = load_params(repo / "params.yaml")
        spec = spec if isinstance(spec, StageSpec) else spec(repo, params)
        name = spec.name
        result = run_stage(spec, body, repo, params, flow_run_id=_current_flow_run_id(flow_run),
                           settle_flow_run=settle_flow_run)
    except UserError as e:
        get_run_logger().error(f"{type(e).__name__}: {e}")
        return Failed(message=f"{e}", data=e)
    except PermissionError as e:  # e.g. a read-only checkpoints/ or data/ discovered mid-stage
        error = DataError(f"stage '{name}' cannot write {e.filename}: {e.strerror}")
        get_run_logger().error(f"DataError: {error}")
        return Failed(message=f"{error}", data=error)
    COMPLETED.add(spec.name)
    url = os.environ.get("PREFECT_API_URL")
    if EXIT_IF_PREFECT_LOST and url and not api_healthy(url, timeout=3.0):
        # The work is done and recorded (outputs, metrics, MLflow); Prefect would retry for minutes and then fail
        # the process, so DVC would not record the outputs. Orchestration is for visibility: exit successfully.
        warn(f"stage '{spec.name}' completed, but the Prefect server at {url} stopped answering; its flow run is "
             "marked Completed when the stage next runs")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return result


def _current_flow_run_id(flow_run) -> Optional[str]:
    try:
        return flow_run.id
    except Exception:  # noqa: BLE001  (not inside a flow)
        return None


def settle_flow_run(flow_run_id: str, completed: bool, note: str) -> bool:
    """Force a still-running Prefect flow run into Completed or Crashed; False if it had already ended."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return False
        client.set_flow_run_state(flow_run_id, Completed(message=note) if completed else Crashed(message=note),
                                  force=True)
        return True
