"""Lineage: which code, data and upstream runs produced a stage's output, in the manifest and in MLflow.

This is the only module that talks to MLflow (imported lazily: it costs ~1.5 s). Tags follow DESIGN.md:
`stage`, `upstream.<stage>.run_id`, `git.commit`, `dvc.lock.digest`; inputs are logged as MLflow datasets whose
digest is the DVC hash of the input (from dvc.lock) when DVC has recorded it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from components.io import read_json, tree_digest

MANIFEST = "manifest.json"
RUN_RECORD = "run.json"
OUTPUT_DIGEST_TAG = "output.digest"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
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


def dvc_stages(repo_root: Path) -> dict[str, dict]:
    """The `stages` of the repo's dvc.yaml as written (a plain YAML read, cached per file version)."""
    path = Path(repo_root) / "dvc.yaml"
    return _read_stages(str(path), path.stat().st_mtime_ns) if path.exists() else {}


@functools.lru_cache(maxsize=4)
def _read_stages(path: str, mtime_ns: int) -> dict[str, dict]:  # mtime_ns: part of the cache key only
    return (yaml.safe_load(Path(path).read_text()) or {}).get("stages") or {}


def entry_paths(entries) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics list (entries are strings or one-key dicts)."""
    return [(e if isinstance(e, str) else next(iter(e))).rstrip("/") for e in entries or []]


def output_producers(repo_root: Path) -> dict[str, str]:
    """Every output path of dvc.yaml (outs, metrics, plots) -> the stage that writes it."""
    return {path: name for name, stage in dvc_stages(repo_root).items()
            for key in ("outs", "metrics", "plots") for path in entry_paths(stage.get(key))}


def git_commit(repo_root: Path) -> Optional[str]:
    """HEAD's sha, with '-dirty' when tracked code differs from it; None outside git.

    Files that `dvc repro` itself writes (dvc.lock, params.yaml under `dvc exp run -S`, every output and metrics
    file of dvc.yaml) do not count: they are recorded as their own digests (`dvc.lock.digest`, `params.digest`),
    so the commit names the code, and the second stage of a `dvc repro` is not '-dirty' because the first one
    rewrote dvc.lock.
    """
    excluded = ["dvc.lock", "params.yaml", *output_producers(repo_root)]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){p}" for p in excluded)], cwd=repo_root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def file_digest(path: Path) -> Optional[str]:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.exists() else None


def dvc_lock_digest(repo_root: Path) -> Optional[str]:
    return file_digest(Path(repo_root) / "dvc.lock")


def params_digest(repo_root: Path) -> Optional[str]:
    return file_digest(Path(repo_root) / "params.yaml")


def content_digest(path: Path) -> Optional[str]:
    """md5 over every file of an output (its manifest included), or of one file; None if it does not exist."""
    path = Path(path)
    if path.is_dir():
        return tree_digest(path, exclude=())
    return file_digest(path)


def run_record_path(repo_root: Path, stage: str) -> Path:
    """The sidecar beside the stage's metrics: which run produced its current output (not hashed by DVC)."""
    return Path(repo_root) / "data" / stage / RUN_RECORD


def producing_run(repo_root: Path, stage: str, digest: Optional[str]) -> dict:
    """The run record of `stage` if it describes the output whose content digest is `digest`, else {}.

    The record is rewritten by every run of the stage; the digest check makes a stale record (after `dvc
    checkout` of another revision, or a restore from DVC's run cache) harmless: the caller then asks MLflow for
    the run tagged with that `output.digest` (`StageRun` does)."""
    path = run_record_path(repo_root, stage)
    if not digest or not path.exists():
        return {}
    with contextlib.suppress(ValueError, OSError):
        record = read_json(path)
        if record.get("output_digest") == digest:
            return record
    return {}


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


def describe_input(repo_root: Path, rel_path: str, producer: Optional[str] = None) -> dict:
    """One input: its path, producing stage, content digest (what the output manifest records), DVC hash (the
    MLflow dataset digest, from dvc.lock when DVC recorded it) and the run that produced exactly this content."""
    path = Path(repo_root) / rel_path
    content = content_digest(path)
    record: dict[str, Any] = {"path": rel_path, "stage": producer, "content_digest": content}
    locked = dvc_locked_hash(repo_root, rel_path)
    if locked:
        record["digest"], record["digest_source"] = locked, "dvc.lock"
    else:
        record["digest"], record["digest_source"] = content, "computed"
    run = producing_run(repo_root, producer, content) if producer else {}
    record["run_id"] = run.get("mlflow_run_id")
    record["git_commit"] = run.get("git_commit")
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

    Without this MLflow stores artifacts under ./mlruns of whatever directory the process started in. The
    experiment is tagged as model development (`mlflow.experimentKind`), MLflow's own switch that makes its UI
    open the experiment on the runs table instead of the GenAI overview ("Traces").
    """
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            location = (db.parent / "mlartifacts").resolve().as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage
            pass
    elif experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag existed
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(name)


def run_with_output(tracking_uri: str, experiment: str, stage: str, digest: Optional[str]) -> Optional[str]:
    """The newest finished run of `stage` whose output had content digest `digest` (its `output.digest` tag)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment) if digest else None
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.stage = '{stage}' and tags.`{OUTPUT_DIGEST_TAG}` = '{digest}' "
                                            "and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def output_run_id(repo_root: Path, stage: str, output: str, experiment: str, tracking_uri: str) -> Optional[str]:
    """The run that produced the current content of `output` (the run record, else MLflow's `output.digest`)."""
    digest = content_digest(Path(repo_root) / output)
    return (producing_run(repo_root, stage, digest).get("mlflow_run_id")
            or run_with_output(tracking_uri, experiment, stage, digest))


class StageRun:
    """An MLflow run for one stage execution, with the lineage tags and input datasets of DESIGN.md."""

    def __init__(self, stage: str, experiment: str, tracking_uri: str, params: dict, inputs: list[dict],
                 repo_root: Path, extra_tags: Optional[dict] = None):
        self.stage, self.experiment, self.tracking_uri = stage, experiment, tracking_uri
        self.params, self.inputs, self.repo_root = params, inputs, repo_root
        self.extra_tags = extra_tags or {}
        self.run_id: Optional[str] = None
        self.parent_run_id = os.environ.get(PARENT_RUN_ENV) or None
        self.child_run_ids: list[str] = []
        self.tags: dict[str, str] = {}

    def __enter__(self) -> "StageRun":
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        ensure_experiment(self.experiment, self.tracking_uri, self.repo_root)
        tags = {"stage": self.stage, "git.commit": git_commit(self.repo_root) or "unknown",
                "dvc.lock.digest": dvc_lock_digest(self.repo_root) or "none",
                "params.digest": params_digest(self.repo_root) or "none"}
        for rec in self.inputs:
            if rec.get("stage") and not rec.get("run_id"):
                rec["run_id"] = run_with_output(self.tracking_uri, self.experiment, rec["stage"],
                                                rec.get("content_digest"))
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
        self.tags.update({k: str(v) for k, v in tags.items()})

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
            self.child_run_ids.append(run.info.run_id)
            if params:
                mlflow.log_params({k: ("null" if v is None else v) for k, v in flatten(params).items()})
            yield ChildRun(run.info.run_id, mlflow)

    def abandon(self) -> None:
        """Forget the run in this process without telling the (unreachable) server: no end_run now or at exit.
        The stage's next run closes it (components/tracking/stage.py `settle_previous_run`)."""
        self._abandoned = True
        from mlflow.tracking import fluent

        with contextlib.suppress(Exception):  # private API; worst case MLflow retries end_run at exit
            fluent._active_run_stack.get().clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        if getattr(self, "_abandoned", False):
            return
        self._mlflow.end_run(status="FAILED" if exc_type else "FINISHED")
        self.ended = True  # the next holder of the stage lock has nothing to close in MLflow


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
    # The `dvc repro` invocation run the dead stage belonged to was left RUNNING too (each stage ends it as it
    # finishes); it is another invocation's than the current one, which has moved on or died with it.
    from components.tracking.runs import INVOCATION_TAG

    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id and parent_id != os.environ.get(PARENT_RUN_ENV):
        parent = client.get_run(parent_id)
        if parent.info.status == "RUNNING" and INVOCATION_TAG in parent.data.tags:
            client.set_tag(parent_id, "stage.ended_by", note)
            client.set_terminated(parent_id, status="FAILED" if status == "FAILED" else "FINISHED")
            ended.append(parent_id)
    return ended
