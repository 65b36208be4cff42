"""The whole DAG as one Prefect flow (README "Driving the pipeline"): one task per DVC stage, in the order of DVC's
own graph of dvc.yaml, each running `dvc --wait-for-lock repro --single-item <stage>`, so DVC alone decides what is
stale (a stage `dvc status` reports up to date is skipped without starting a dvc process). A stage DVC did not run
finishes as a Completed state named "Skipped" or "Cached"; a failed stage fails the flow at once, naming it. One
MLflow parent run per pipeline run (the stage runs nest under it through PIPELINE_PARENT_RUN_ID). Overrides are
validated first, written into params.yaml as `dvc exp run -S` does, and the result saved with `dvc exp save`. A
pipeline-wide file lock (.dvc/tmp/pipeline.lock) makes a second run wait, so params.yaml is never rewritten under
a running pipeline.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as flow_run_context
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Failed

from components.config import load_params, parse_override, write_overrides
from components.errors import UserError
from components.io import HolderLock, describe_holder
from components.tracking.lineage import resolve_tracking_uri
from components.tracking.registry import check_tracking_server
from flows.runtime import repo_root

ALL = "all"
LOCK_FILE = ".dvc/tmp/pipeline.lock"
RAN, SKIPPED, CACHED = "Ran", "Skipped", "Cached"


class UnknownStage(UserError):
    """A target that is not a stage of dvc.yaml."""


class StageFailed(UserError):
    """`dvc repro` of one stage failed; the message names the stage and DVC's last error line."""


# ---------------------------------------------------------------- the DAG, read from DVC

def dvc_graph(root: Path) -> tuple[list[str], dict[str, set[str]]]:
    """All stages of dvc.yaml in a dependency order (ties broken by name) and each stage's direct upstream
    stages, from DVC's own stage graph (read once per dvc.yaml version)."""
    from dvc.exceptions import DvcException

    dvc_yaml = Path(root) / "dvc.yaml"
    stamp = dvc_yaml.stat().st_mtime_ns if dvc_yaml.exists() else 0
    try:
        return _read_dvc_graph(str(Path(root).resolve()), stamp)
    except DvcException as e:  # e.g. overlapping outputs, a cycle, a bad dvc.yaml: DVC's message, one line
        raise UserError(f"DVC cannot build the pipeline graph: {' '.join(str(e).split())}") from None


@functools.lru_cache(maxsize=4)
def _read_dvc_graph(root: str, dvc_yaml_mtime_ns: int):  # the mtime is only part of the cache key
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        names = {stage: stage.addressing for stage in graph.nodes}
        upstream = {names[s]: {names[d] for d in graph.successors(s)} for s in graph.nodes}
        order = [names[s] for s in nx.lexicographical_topological_sort(graph.reverse(copy=True),
                                                                       key=lambda s: names[s])]
    return order, upstream


def plan_stages(root: Path, targets: Optional[list[str]] = None) -> list[str]:
    """The stages to reproduce for `targets` (stage names or "all"), upstream first, as `dvc repro` would.

    Raises UnknownStage naming the first target that is not in dvc.yaml.
    """
    order, upstream = dvc_graph(root)
    targets = list(targets or [ALL])
    if not targets or ALL in targets:
        return order
    for target in targets:
        if target not in upstream:
            raise UnknownStage(f"unknown target stage '{target}'; dvc.yaml has: {', '.join(order) or '(none)'}")
    wanted: set[str] = set()
    pending = list(targets)
    while pending:
        stage = pending.pop()
        if stage not in wanted:
            wanted.add(stage)
            pending.extend(upstream[stage])
    return [s for s in order if s in wanted]


# ---------------------------------------------------------------- overrides

def experiment_name(run_name: str) -> str:
    """A valid DVC experiment (git ref) name derived from the run name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-.") or "pipeline"
    return name[:80]


# ---------------------------------------------------------------- running DVC

def subprocess_env() -> dict[str, str]:
    """This process's env (PREFECT_API_URL, MLFLOW_TRACKING_URI, PIPELINE_PARENT_RUN_ID) with the venv first on
    PATH, so the stages' `python -m flows ...` use this interpreter."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "true"
    env.pop("DVC_ROOT", None)  # DVC sets it for the stage it runs
    return env


def run_dvc(root: Path, args: list[str], log=None) -> tuple[int, list[str]]:
    """Run `dvc --wait-for-lock <args>` in the repo, streaming its output to `log`; (exit code, lines)."""
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", *args]
    proc = subprocess.Popen(command, cwd=root, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    lines = []
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        if log and line:
            log(line)
    return proc.wait(), lines


def classify(stage: str, lines: list[str]) -> str:
    """What DVC did with the stage, from its own messages."""
    text = "\n".join(lines)
    if f"Running stage '{stage}'" in text:
        return RAN
    if f"Stage '{stage}' is cached" in text:
        return CACHED
    return SKIPPED


def dvc_reports_up_to_date(root: Path, stage: str) -> bool:
    """DVC's own `status` of one stage, asked in-process (~0.1 s instead of ~1 s for a `dvc` process).

    The same check `dvc repro` makes (stage definition, deps and params vs dvc.lock, outputs present), asked
    after the upstream stages of this run finished, so their new outputs count. Any problem (e.g. the repo lock
    held by another dvc process) answers False and the stage goes to `dvc repro`, which waits and decides.
    """
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            return not repo.status(targets=[stage])
    except Exception:  # noqa: BLE001 - any doubt: let `dvc repro` decide
        return False


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=NO_CACHE)
def reproduce_stage(stage: str, root: str, force: bool = False):
    """`dvc repro --single-item <stage>`: DVC decides whether it is stale. Returns a Completed state named
    Ran / Skipped / Cached (shown in the UI); raises StageFailed naming the stage on failure."""
    logger = get_run_logger()
    started = time.perf_counter()
    if not force and dvc_reports_up_to_date(Path(root), stage):
        seconds = round(time.perf_counter() - started, 2)
        logger.info(f"Stage '{stage}' didn't change, skipping (dvc status: up to date)")
        return Completed(message=f"{stage}: skipped in {seconds} s", name=SKIPPED,
                         data={"stage": stage, "outcome": SKIPPED, "seconds": seconds})
    code, lines = run_dvc(Path(root), ["repro", "--single-item", stage, *(["--force"] if force else [])],
                          log=logger.info)
    seconds = round(time.perf_counter() - started, 2)
    if code != 0:
        last = next((l for l in reversed(lines) if l.strip().startswith(("ERROR", "error"))), None)
        last = last or next((l for l in reversed(lines) if l.strip()), "no output")
        raise StageFailed(f"stage '{stage}' failed (dvc repro exit {code}): {last.strip()}")
    outcome = classify(stage, lines)
    result = {"stage": stage, "outcome": outcome, "seconds": seconds}
    return Completed(message=f"{stage}: {outcome.lower()} in {seconds} s", name=outcome, data=result)


def pipeline_lock(root: Path, log) -> HolderLock:
    """The pipeline-wide lock; a second pipeline run waits for it (and says for whom) until the first ends."""
    return HolderLock(root / LOCK_FILE, purpose="pipeline", on_wait=lambda holder: log(
        f"another pipeline run holds {LOCK_FILE} ({describe_holder(holder)}); waiting for it to finish"))


# ---------------------------------------------------------------- the flow

def check_request(root: Path, targets: Optional[list[str]], overrides: Optional[list[str]]):
    """Everything checked before anything runs: targets, overrides, the MLflow server; (plan, overrides, params, uri)."""
    plan = plan_stages(root, targets)
    parsed = dict(parse_override(o) for o in overrides or [])
    params = load_params(root / "params.yaml", parsed, source=f"override of {', '.join(parsed)}" if parsed else None)
    tracking_uri = resolve_tracking_uri(root, params.tracking.uri)
    check_tracking_server(tracking_uri)
    return plan, parsed, params, tracking_uri


def execute(root: Path, targets: Optional[list[str]], force: bool, overrides: Optional[list[str]],
            run_name: Optional[str], log) -> dict:
    """The pipeline body (outside Prefect's wrapper so the CLI and the benchmark can report errors cleanly)."""
    from components.tracking.runs import PipelineRun, current_output_run_id

    plan, parsed, params, tracking_uri = check_request(root, targets, overrides)
    run_name = run_name or f"pipeline-{flow_run_context.name or time.strftime('%Y%m%d-%H%M%S')}"
    log(f"plan: {' -> '.join(plan) or '(no stages)'}" + (f"; overrides {parsed}" if parsed else ""))
    with pipeline_lock(root, log):
        if parsed:
            write_overrides(root / "params.yaml", parsed)
        tags = {"pipeline.targets": ",".join(targets or [ALL]), "pipeline.force": str(bool(force)),
                "prefect.flow_run_id": flow_run_context.id or "none"}
        summary: dict[str, Any] = {"run_name": run_name, "plan": plan, "overrides": parsed, "stages": []}
        with PipelineRun(params.tracking.experiment, tracking_uri, root, run_name,
                         params={"override": parsed} if parsed else None, extra_tags=tags) as parent:
            summary["mlflow_parent_run_id"] = parent.run_id
            for stage in plan:
                state = reproduce_stage(stage, str(root), force, return_state=True)
                if not state.is_completed():
                    parent.set_tags({f"stage.{stage}.outcome": "Failed"})
                    cause = state.result(raise_on_failure=False)
                    raise cause if isinstance(cause, UserError) else StageFailed(
                        f"stage '{stage}' failed: {state.message}")
                record = {**state.result(), "mlflow_run_id": current_output_run_id(
                    root, stage, params.tracking.experiment, tracking_uri)}
                summary["stages"].append(record)
                parent.set_tags({f"stage.{stage}.outcome": record["outcome"],
                                 f"stage.{stage}.run_id": record["mlflow_run_id"] or "none"})
                parent.log_metrics({f"{stage}.seconds": record["seconds"]})
            if parsed:
                name = experiment_name(run_name)
                code, lines = run_dvc(root, ["exp", "save", "--force", "--name", name, *plan])
                if code != 0:
                    raise UserError(f"`dvc exp save` failed: {lines[-1] if lines else 'no output'}")
                summary["dvc_experiment"] = name
                parent.set_tags({"dvc.exp.name": name})
    return summary


def publish_summary(summary: dict) -> None:
    """A table artifact in the Prefect UI: each stage, what DVC did, seconds, its MLflow run."""
    from prefect.artifacts import create_table_artifact

    rows = [{"stage": r["stage"], "outcome": r["outcome"], "seconds": r["seconds"],
             "mlflow_run_id": r["mlflow_run_id"] or ""} for r in summary["stages"]]
    create_table_artifact(key="pipeline-stages", table=rows,
                          description=f"MLflow parent run {summary.get('mlflow_parent_run_id')}")


def flow_run_name() -> str:
    """The Prefect flow run is named after `run_name` when given (else Prefect's random slug)."""
    from prefect.utilities.names import generate_slug

    return flow_run_context.parameters.get("run_name") or generate_slug(2)


@flow(name="pipeline", flow_run_name=flow_run_name, description="Reproduce the DVC pipeline (or some targets) stage by stage; DVC decides "
                                   "what is stale. Overrides are key.path=value, recorded as a DVC experiment.")
def pipeline(targets: list[str] = [ALL], force: bool = False, overrides: list[str] = [],  # noqa: B006
             run_name: Optional[str] = None):
    """targets: stage names or "all"; force: rerun even if up to date; overrides: e.g. ["shard.seed=1"];
    run_name: the MLflow parent run and DVC experiment name (default: pipeline-<flow run name>)."""
    logger = get_run_logger()
    root = repo_root()
    try:
        summary = execute(root, targets, force, overrides, run_name, logger.info)
    except UserError as e:
        logger.error(f"{type(e).__name__}: {e}")
        return Failed(message=str(e), data=e)
    publish_summary(summary)
    logger.info(", ".join(f"{r['stage']}: {r['outcome']}" for r in summary["stages"]) or "nothing to do")
    return summary


flow_fn = pipeline


def run_pipeline_command(targets: list[str], force: bool, overrides: list[str], run_name: Optional[str]) -> int:
    """`python -m flows pipeline`: check the request before any server starts, run the flow, print a summary."""
    from flows.runtime import configure_prefect

    root = repo_root()
    check_request(root, targets, overrides)  # bad target / override / MLflow server: one line, nothing runs
    api_url = configure_prefect(root)
    # Prefect read its settings when this module imported it, before configure_prefect chose the server.
    with (temporary_settings(updates={PREFECT_API_URL: api_url}) if api_url.startswith("http")
          else contextlib.nullcontext()):
        state = pipeline(targets=targets, force=force, overrides=overrides, run_name=run_name, return_state=True)
    if not state.is_completed():
        cause = state.result(raise_on_failure=False)
        if isinstance(cause, UserError):
            raise cause
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    summary = state.result()
    for record in summary["stages"]:
        print(f"{record['stage']:<16} {record['outcome']:<8} {record['seconds']:>7.2f} s  "
              f"mlflow run {record['mlflow_run_id'] or '-'}")
    print(f"MLflow parent run {summary['mlflow_parent_run_id']}"
          + (f"; DVC experiment '{summary['dvc_experiment']}'" if summary.get("dvc_experiment") else ""))
    return 0
