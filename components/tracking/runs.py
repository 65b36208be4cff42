"""Pipeline parent runs and lineage queries over the MLflow runs written by `StageRun`.

`PipelineRun` is the one MLflow run per pipeline execution; stage runs become its children through the
PIPELINE_PARENT_RUN_ID environment variable (read by `StageRun`). `lineage_chain` follows the
`upstream.<stage>.run_id` tags from one run back to the data. Both use `MlflowClient` (no global active run),
so they are safe inside a long-lived process such as a Prefect flow.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from components.errors import UserError
from components.tracking.lineage import (PARENT_RUN_ENV, dvc_lock_digest, dvc_stages, ensure_experiment, flatten,
                                         git_commit, output_producers, output_run_id)

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


def params_overrides(root: Path) -> dict:
    """The params.yaml keys that differ from the committed file (what `dvc exp run -S` or an edit changed)."""
    import subprocess

    import yaml

    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True)
    if committed.returncode != 0 or not (root / "params.yaml").exists():
        return {}
    before = flatten(yaml.safe_load(committed.stdout) or {})
    after = flatten(yaml.safe_load((root / "params.yaml").read_text()) or {})
    return {key: after.get(key) for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)}


class InvocationRun:
    """The MLflow parent run shared by the stages of one `dvc repro` / `dvc exp run` (so `make demo`, a manual
    `dvc repro` and each queued experiment are one parent run with the stage runs as children). Not used when
    the pipeline flow already opened a parent run (PIPELINE_PARENT_RUN_ID) or DVC did not start the stage
    (`invocation` None; else `<pid>-<start time>` of the `dvc` process, shared by the stages it runs).

    The run is found by its `dvc.invocation` tag (set RUNNING again) or created (tags as `PipelineRun`), named
    after the DVC experiment (DVC_EXP_NAME) or `dvc-repro-<time>`; its params `override.*` are the params.yaml
    keys that differ from HEAD. Each stage ends it (FAILED if it failed), so nothing stays RUNNING between stages.
    """

    def __init__(self, root: Path, experiment: str, tracking_uri: str, invocation: Optional[str]):
        self.root, self.experiment, self.tracking_uri = root, experiment, tracking_uri
        self.invocation = None if os.environ.get(PARENT_RUN_ENV) else invocation
        self.run_id: Optional[str] = None
        self.run_name: Optional[str] = None

    def __enter__(self) -> "InvocationRun":
        if self.invocation is None:
            return self
        import time

        from mlflow import MlflowClient

        from components.tracking.registry import check_tracking_server

        check_tracking_server(self.tracking_uri)  # one line, not minutes of HTTP retries
        started = time.localtime(int(self.invocation.rsplit("-", 1)[1]))
        exp_name = os.environ.get("DVC_EXP_NAME")
        self.run_name = exp_name or f"dvc-repro-{time.strftime('%Y%m%d-%H%M%S', started)}"
        ensure_experiment(self.experiment, self.tracking_uri, self.root)
        client = MlflowClient(self.tracking_uri)
        experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        found = client.search_runs([experiment_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{self.invocation}'",
                                   max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"pipeline": "true", INVOCATION_TAG: self.invocation,
                    "git.commit": git_commit(self.root) or "unknown",
                    "dvc.lock.digest.start": dvc_lock_digest(self.root) or "none",
                    **({"dvc.exp.name": exp_name} if exp_name else {})}
            self.run_id = client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
            overrides = params_overrides(self.root)
            for key, value in flatten({"override": overrides} if overrides else {}).items():
                client.log_param(self.run_id, key, "null" if value is None else str(value)[:6000])
        os.environ[PARENT_RUN_ENV] = self.run_id
        return self

    def close(self, stage: str, failed: bool) -> None:
        """Record the stage's outcome on the run and end it (FAILED if the stage failed)."""
        if not self.run_id:
            return
        from mlflow import MlflowClient

        try:
            client = MlflowClient(self.tracking_uri)
            client.set_tag(self.run_id, f"stage.{stage}.outcome", "Failed" if failed else "Ran")
            client.set_tag(self.run_id, "dvc.lock.digest", dvc_lock_digest(self.root) or "none")
            client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        except Exception as e:  # noqa: BLE001 - the stage's own outcome stands; the next stage reopens the run
            print(f"warning: could not update the MLflow parent run {self.run_id} ({type(e).__name__}: "
                  f"{str(e)[:200]})", file=sys.stderr)
        self.run_id = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(os.environ.get("DVC_STAGE", "?"), failed=exc_type is not None)


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


RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_ref(root: Path, ref: str, experiment: str, tracking_uri: str) -> str:
    """A run id for `ref`: itself if it looks like one, else the run that produced the stage's *current* output
    (its run record when it describes the output's current content, else the MLflow run tagged with that content
    digest, so a stage DVC skipped or restored still points at the run that really made its data); if the output
    is missing, the newest finished run tagged with that stage."""
    if RUN_ID.match(ref):
        return ref
    stages = dvc_stages(root)
    if ref not in stages:
        raise RunNotFound(f"'{ref}' is neither an MLflow run id nor a stage of dvc.yaml "
                          f"({', '.join(stages) or 'no stages'})")
    run_id = (current_output_run_id(root, ref, experiment, tracking_uri)
              or latest_stage_run_id(experiment, ref, tracking_uri))
    if not run_id:
        raise RunNotFound(f"stage '{ref}' has no output manifest and no finished MLflow run in '{experiment}'")
    return run_id


def current_output_run_id(root: Path, stage: str, experiment: str, tracking_uri: str) -> Optional[str]:
    """The run that produced the current content of the stage's output (its run record or `output.digest` tag)."""
    for out in (path for path, producer in output_producers(root).items() if producer == stage):
        if (root / out).is_dir():
            run_id = output_run_id(root, stage, out, experiment, tracking_uri)
            if run_id:
                return run_id
    return None


def format_chain(chain: list[dict[str, Any]]) -> str:
    """`python -m flows lineage`: each run with its stage, status, git commit, parent run, inputs (dataset name +
    digest, the DVC hash from dvc.lock) and upstream runs."""
    lines = []
    for record in chain:
        if record.get("missing"):
            lines.append(f"- run {record['run_id']}: MISSING (referenced upstream, not in this tracking store)")
            continue
        lines.append(f"- {record['stage'] or '?'}  run {record['run_id']}  [{record['status']}]")
        lines.append(f"    git commit  {record['git_commit']}")
        lines.append(f"    parent run  {record['parent_run_id'] or '-'}")
        for ds in record["inputs"]:
            lines.append(f"    input       {ds['name']}  digest {ds['digest']}  (from {ds['context']})")
        for stage, run_id in record["upstream"].items():
            lines.append(f"    upstream    {stage} -> run {run_id}")
        if not record["upstream"] and not record["inputs"]:
            data = {k: v for k, v in record["params"].items() if k.startswith("data.")}
            lines.append(f"    source data {', '.join(f'{k}={v}' for k, v in sorted(data.items())) or '-'}")
    return "\n".join(lines)
