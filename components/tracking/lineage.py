"""Lineage: which code, data and upstream runs produced a stage's output, in the manifest and in MLflow.

This is the only module that talks to MLflow (imported lazily: it costs ~1.5 s). Tags follow DESIGN.md:
`stage`, `upstream.<stage>.run_id`, `git.commit`, `dvc.lock.digest`; inputs are logged as MLflow datasets whose
digest is the DVC hash of the input (from dvc.lock) when DVC has recorded it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from components.io import read_json, tree_digest

MANIFEST = "manifest.json"
PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"  # set by the pipeline flow so stage runs nest under its run


def resolve_tracking_uri(repo_root: Path, configured: Optional[str] = None) -> str:
    """MLFLOW_TRACKING_URI wins, then params' tracking.uri, then an absolute sqlite file in the repo.

    An absolute path keeps every process (dvc repro, Prefect subprocesses, tests) on one database whatever
    its working directory.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{(Path(repo_root).resolve() / 'mlflow.db').as_posix()}"


def git_commit(repo_root: Path) -> Optional[str]:
    """HEAD's sha, with a '-dirty' suffix when tracked files differ from it; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def dvc_lock_digest(repo_root: Path) -> Optional[str]:
    lock = Path(repo_root) / "dvc.lock"
    return hashlib.md5(lock.read_bytes()).hexdigest() if lock.exists() else None


def dvc_locked_hash(repo_root: Path, rel_path: str) -> Optional[str]:
    """The hash DVC recorded in dvc.lock for an output path (a directory hash ends in '.dir'), if any."""
    lock = Path(repo_root) / "dvc.lock"
    if not lock.exists():
        return None
    data = yaml.safe_load(lock.read_text()) or {}
    want = Path(rel_path).as_posix().rstrip("/")
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(out.get("path", "")).as_posix().rstrip("/") == want:
                return out.get("md5") or out.get("hash")
    return None


def describe_input(repo_root: Path, rel_path: str) -> dict:
    """Path, content digest and producing run of one input, read from dvc.lock and the input's manifest."""
    path = Path(repo_root) / rel_path
    record: dict[str, Any] = {"path": rel_path, "stage": None, "run_id": None}
    locked = dvc_locked_hash(repo_root, rel_path)
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).exists() else {}
    if locked:
        record["digest"], record["digest_source"] = locked, "dvc.lock"
    elif manifest.get("digest"):
        record["digest"], record["digest_source"] = manifest["digest"], "manifest"
    else:
        record["digest"], record["digest_source"] = (tree_digest(path) if path.is_dir() else None), "computed"
    lineage = manifest.get("lineage", {})
    record["stage"] = lineage.get("stage")
    record["run_id"] = lineage.get("mlflow_run_id")
    return record


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def ensure_experiment(name: str, tracking_uri: str, repo_root: Path) -> None:
    """Select the experiment, creating it with an absolute artifact root for a local sqlite store.

    Without this MLflow stores artifacts under ./mlruns of whatever directory the process started in.
    """
    import mlflow

    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            location = (db.parent / "mlartifacts").resolve().as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage
            pass
    mlflow.set_experiment(name)


class StageRun:
    """An MLflow run for one stage execution, with the lineage tags and input datasets of DESIGN.md."""

    def __init__(self, stage: str, experiment: str, tracking_uri: str, params: dict, inputs: list[dict],
                 repo_root: Path, extra_tags: Optional[dict] = None):
        self.stage, self.experiment, self.tracking_uri = stage, experiment, tracking_uri
        self.params, self.inputs, self.repo_root = params, inputs, repo_root
        self.extra_tags = extra_tags or {}
        self.run_id: Optional[str] = None
        self.parent_run_id = os.environ.get(PARENT_RUN_ENV) or None
        self.tags: dict[str, str] = {}

    def __enter__(self) -> "StageRun":
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        ensure_experiment(self.experiment, self.tracking_uri, self.repo_root)
        tags = {"stage": self.stage, "git.commit": git_commit(self.repo_root) or "unknown",
                "dvc.lock.digest": dvc_lock_digest(self.repo_root) or "none"}
        for rec in self.inputs:
            if rec.get("stage") and rec.get("run_id"):
                tags[f"upstream.{rec['stage']}.run_id"] = rec["run_id"]
        for var in ("DVC_STAGE", "DVC_EXP_NAME"):
            if os.environ.get(var):
                tags[f"dvc.{var.lower().removeprefix('dvc_')}"] = os.environ[var]
        tags.update({k: str(v) for k, v in self.extra_tags.items()})
        self.tags = tags
        run = mlflow.start_run(run_name=self.stage, tags=tags, parent_run_id=self.parent_run_id)
        self.run_id = run.info.run_id
        flat = {k: ("null" if v is None else v) for k, v in flatten(self.params).items()}
        if flat:
            mlflow.log_params(flat)
        for rec in self.inputs:
            if rec.get("digest"):
                with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local paths
                    warnings.simplefilter("ignore", UserWarning)
                    source = resolve_dataset_source(str((self.repo_root / rec["path"]).resolve()))
                ds = MetaDataset(source=source, name=rec["path"], digest=str(rec["digest"]))
                mlflow.log_input(ds, context=rec.get("stage") or "input")
        return self

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        clean = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_artifacts(self, directory: Path, artifact_path: Optional[str] = None) -> None:
        self._mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @contextlib.contextmanager
    def child_run(self, name: str, params: Optional[dict] = None, tags: Optional[dict] = None):
        """A run nested under this stage's run (one per round or sub-model), active inside the block.

        Yields a `ChildRun`; its `log_metrics(metrics, step)` is also a Trainer `log_fn`. A failure inside the
        block marks the child FAILED and propagates.
        """
        mlflow = self._mlflow
        all_tags = {"stage": self.stage, "stage.child_of": self.run_id,
                    "git.commit": self.tags.get("git.commit", "unknown"),
                    **{k: str(v) for k, v in (tags or {}).items()}}
        with mlflow.start_run(run_name=name, nested=True, tags=all_tags) as run:
            if params:
                mlflow.log_params({k: ("null" if v is None else v) for k, v in flatten(params).items()})
            yield ChildRun(run.info.run_id, mlflow)

    def abandon(self) -> None:
        """Forget the run in this process without telling the (unreachable) server: no end_run now or at exit.
        The stage's next run closes it (flows/stage.py `settle_previous_run`)."""
        self._abandoned = True
        from mlflow.tracking import fluent

        with contextlib.suppress(Exception):  # private API; worst case MLflow retries end_run at exit
            fluent._active_run_stack.get().clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        if getattr(self, "_abandoned", False):
            return
        self._mlflow.end_run(status="FAILED" if exc_type else "FINISHED")


class ChildRun:
    """Handle on a child run opened by `StageRun.child_run`."""

    def __init__(self, run_id: str, mlflow_module) -> None:
        self.run_id = run_id
        self._mlflow = mlflow_module

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        clean = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            self._mlflow.log_metrics(clean, step=step)


def end_abandoned_run(tracking_uri: str, run_id: str, status: str, note: str) -> list[str]:
    """End a run, and its child runs, still RUNNING after the process that owned it died; returns the ids ended.

    `status` is FAILED for a killed stage, FINISHED for one whose work completed but which could not end its run
    (tracking server unreachable at the end). `note` goes into the `stage.ended_by` tag.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    ended = []
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")
    for r in [*children, run]:
        if r.info.status == "RUNNING":
            client.set_tag(r.info.run_id, "stage.ended_by", note)
            client.set_terminated(r.info.run_id, status=status)
            ended.append(r.info.run_id)
    return ended
