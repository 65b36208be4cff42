"""Pipeline parent runs and lineage queries over the MLflow runs written by `StageRun`.

`PipelineRun` is the one MLflow run per pipeline execution; stage runs become its children through the
PIPELINE_PARENT_RUN_ID environment variable (read by `StageRun`). `lineage_chain` follows the
`upstream.<stage>.run_id` tags from one run back to the data. Both use `MlflowClient` (no global active run),
so they are safe inside a long-lived process such as a Prefect flow.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from components.errors import UserError
from components.tracking.lineage import (PARENT_RUN_ENV, dvc_lock_digest, ensure_experiment, flatten,
                                         git_commit)

UPSTREAM_PREFIX = "upstream."
UPSTREAM_SUFFIX = ".run_id"


class RunNotFound(UserError):
    """A run id or stage name that has no MLflow run."""


class PipelineRun:
    """The parent MLflow run of one pipeline execution (context manager).

    On enter it creates the run (tags: `pipeline`, `git.commit`, `dvc.lock.digest` as of the start, plus
    `extra_tags`) and exports PIPELINE_PARENT_RUN_ID so every subprocess (dvc repro -> stage) nests under it;
    on exit it records the final `dvc.lock.digest`, ends the run FINISHED or FAILED and restores the env.
    """

    def __init__(self, experiment: str, tracking_uri: str, repo_root: Path, run_name: str,
                 params: Optional[dict[str, Any]] = None, extra_tags: Optional[dict[str, Any]] = None):
        self.experiment, self.tracking_uri, self.repo_root = experiment, tracking_uri, Path(repo_root)
        self.run_name, self.params, self.extra_tags = run_name, params or {}, extra_tags or {}
        self.run_id: Optional[str] = None
        self._previous_env: Optional[str] = None

    def __enter__(self) -> "PipelineRun":
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(self.tracking_uri)
        ensure_experiment(self.experiment, self.tracking_uri, self.repo_root)
        self._client = MlflowClient(self.tracking_uri)
        experiment_id = self._client.get_experiment_by_name(self.experiment).experiment_id
        tags = {"pipeline": "true", "git.commit": git_commit(self.repo_root) or "unknown",
                "dvc.lock.digest.start": dvc_lock_digest(self.repo_root) or "none",
                **{k: str(v) for k, v in self.extra_tags.items()}}
        run = self._client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        for key, value in flatten(self.params).items():
            self._client.log_param(self.run_id, key, "null" if value is None else str(value)[:6000])
        self._previous_env = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = self.run_id
        return self

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._client.log_metric(self.run_id, key, float(value))

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous_env is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = self._previous_env
        self._client.set_tag(self.run_id, "dvc.lock.digest", dvc_lock_digest(self.repo_root) or "none")
        self._client.set_terminated(self.run_id, status="FAILED" if exc_type else "FINISHED")


INVOCATION_TAG = "dvc.invocation"


def open_invocation_run(experiment: str, tracking_uri: str, repo_root: Path, invocation: str, run_name: str,
                        params: Optional[dict[str, Any]] = None, extra_tags: Optional[dict[str, Any]] = None) -> str:
    """The parent run of one `dvc repro` / `dvc exp run` invocation, shared by the stages it runs one after
    another: found by its `dvc.invocation` tag (set RUNNING again) or created (tags as `PipelineRun`, params
    `override.*`). Each stage ends it with `close_invocation_run`, so nothing stays RUNNING between stages."""
    from mlflow import MlflowClient

    ensure_experiment(experiment, tracking_uri, repo_root)
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}'",
                               max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {"pipeline": "true", INVOCATION_TAG: invocation, "git.commit": git_commit(repo_root) or "unknown",
            "dvc.lock.digest.start": dvc_lock_digest(repo_root) or "none",
            **{k: str(v) for k, v in (extra_tags or {}).items()}}
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    for key, value in flatten(params or {}).items():
        client.log_param(run_id, key, "null" if value is None else str(value)[:6000])
    return run_id


def close_invocation_run(tracking_uri: str, run_id: str, repo_root: Path, stage: str, failed: bool) -> None:
    """Record the stage's outcome on the invocation run and end it (FAILED if the stage failed)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    client.set_tag(run_id, f"stage.{stage}.outcome", "Failed" if failed else "Ran")
    client.set_tag(run_id, "dvc.lock.digest", dvc_lock_digest(repo_root) or "none")
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def upstream_run_ids(tags: dict[str, str]) -> dict[str, str]:
    """`upstream.<stage>.run_id` tags of a run as {stage: run id}."""
    return {key[len(UPSTREAM_PREFIX):-len(UPSTREAM_SUFFIX)]: value for key, value in tags.items()
            if key.startswith(UPSTREAM_PREFIX) and key.endswith(UPSTREAM_SUFFIX)}


def describe_run(client, run_id: str) -> dict[str, Any]:
    """One lineage record: stage, run id, status, git commit, parent, inputs (name, digest), upstream runs."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return {"run_id": run_id, "missing": True}
    tags = run.data.tags
    inputs = []
    for dataset_input in (run.inputs.dataset_inputs if run.inputs else []):
        ds = dataset_input.dataset
        context = next((t.value for t in dataset_input.tags if t.key == "mlflow.data.context"), None)
        inputs.append({"name": ds.name, "digest": ds.digest, "context": context})
    return {
        "run_id": run_id, "missing": False,
        "stage": tags.get("stage"),
        "status": run.info.status,
        "git_commit": tags.get("git.commit"),
        "dvc_lock_digest": tags.get("dvc.lock.digest"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "start_time_ms": run.info.start_time,
        "inputs": inputs,
        "upstream": upstream_run_ids(tags),
        "params": dict(run.data.params),
    }


def lineage_chain(run_id: str, tracking_uri: str) -> list[dict[str, Any]]:
    """The run and every run upstream of it, breadth first (the given run first, the data-producing runs last).

    Each run appears once even when several downstream runs share it. A referenced run that no longer exists
    appears as {"run_id", "missing": True} instead of stopping the walk. Raises RunNotFound if `run_id` itself
    does not exist.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    first = describe_run(client, run_id)
    if first["missing"]:
        raise RunNotFound(f"no MLflow run with id '{run_id}' in {tracking_uri}")
    chain, seen, queue = [], {run_id}, [first]
    while queue:
        record = queue.pop(0)
        chain.append(record)
        for upstream_id in (record.get("upstream") or {}).values():
            if upstream_id not in seen:
                seen.add(upstream_id)
                queue.append(describe_run(client, upstream_id))
    return chain


def latest_stage_run_id(experiment: str, stage: str, tracking_uri: str) -> Optional[str]:
    """The newest FINISHED run tagged `stage=<stage>` in the experiment, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_obj = client.get_experiment_by_name(experiment)
    if experiment_obj is None:
        return None
    runs = client.search_runs([experiment_obj.experiment_id],
                              filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def child_runs(parent_run_id: str, experiment: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Runs whose `mlflow.parentRunId` is `parent_run_id`, oldest first, as lineage records."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_obj = client.get_experiment_by_name(experiment)
    if experiment_obj is None:
        return []
    runs = client.search_runs([experiment_obj.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"])
    return [describe_run(client, r.info.run_id) for r in runs]

