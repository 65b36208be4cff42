"""The stage contract of DESIGN.md, implemented once and used by every stage flow.

A stage flow is `run_stage(SPEC, body)` inside a Prefect @flow. `run_stage`:
1. validates params.yaml (typed schema; a bad value stops the stage naming the key, nothing written);
2. checks its inputs (the dvc.yaml deps another stage produces) exist and finds the run that produced each;
3. opens the stage's MLflow run (tags: stage, upstream.<stage>.run_id, git.commit, dvc.lock.digest, params.digest);
4. lets `body(ctx)` write into a temp dir that becomes the output only on success (atomic);
5. writes manifest.json into the output: only what the inputs determine (stage, params used, input digests), so
   an unchanged rerun gives a byte-identical output; writes the metrics file; tags the run with the output's
   content digest (`output.digest`) and writes the run record data/<stage>/run.json (run id, commit, digests,
   times, upstream runs): a sidecar DVC does not hash, which is how a downstream stage finds the producing run.
"""
from __future__ import annotations

import hashlib
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from components.config import Params, load_params
from components.errors import DataError, UserError
from components.io import atomic_output_dir, read_json, remove_stale_temp_dirs, write_json
from components.tracking.lineage import (MANIFEST, OUTPUT_DIGEST_TAG, StageRun, content_digest, describe_input,
                                         dvc_locked_hash, dvc_stages, entry_paths, output_producers,
                                         resolve_tracking_uri, run_record_path)
from components.tracking.registry import MODEL_SPEC_FILE, check_tracking_server, log_and_register_model
from flows.runtime import repo_root


@dataclass(frozen=True)
class StageSpec:
    """What a stage writes and reads. Its inputs and their producers come from dvc.yaml (the one place the DAG is
    declared): by default every dep of the stage that another stage outputs; a stage whose inputs depend on params
    (evaluate, preferences, dpo, consistency) passes the subset it reads."""
    name: str
    output: str  # the one output directory, relative to the repo root
    inputs: Optional[tuple[str, ...]] = None  # upstream outputs it reads; None: its dvc.yaml deps that are outputs
    sections: tuple[str, ...] = ()  # params sections it reads (recorded in the manifest and MLflow)

    def __post_init__(self) -> None:
        # DVC refuses an output directory that contains another output (the metrics file): fail at import.
        if Path(self.metrics_path).is_relative_to(self.output):
            raise ValueError(f"stage '{self.name}': its metrics file {self.metrics_path} lies inside its output "
                             f"{self.output}; move the output (e.g. to {self.output}/<name>)")

    @property
    def metrics_path(self) -> str:
        return f"data/{self.name}/metrics.json"


@dataclass
class StageContext:
    spec: StageSpec
    repo: Path
    params: Params
    out_dir: Path  # temp dir; becomes spec.output when the stage succeeds
    run: StageRun
    inputs: list[dict]
    manifest: dict = field(default_factory=dict)  # body adds stage-specific entries here (content only)
    record: dict = field(default_factory=dict)  # run-specific facts (child run ids, ...): the run record, not the output

    def path(self, rel: str) -> Path:
        return self.repo / rel

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.run.log_metrics(metrics, step=step)


def declared_deps(repo: Path, stage: str) -> list[str]:
    """The deps of `stage` in dvc.yaml (paths, in order); empty when the stage is not declared."""
    return entry_paths(dvc_stages(repo).get(stage, {}).get("deps"))


def stage_inputs(repo: Path, spec: StageSpec) -> tuple[str, ...]:
    """The upstream outputs the stage reads: `spec.inputs`, or its dvc.yaml deps that another stage produces.

    An explicit input missing from the stage's dvc.yaml deps is a staleness hole (`dvc repro` would not rerun the
    stage when it changes): warn, naming the line to add."""
    producers = output_producers(repo)
    deps = declared_deps(repo, spec.name)
    if spec.inputs is None:
        return tuple(d for d in deps if d in producers and producers[d] != spec.name)
    if spec.name in dvc_stages(repo):
        for rel in spec.inputs:
            if rel not in deps:
                warnings.warn(f"stage '{spec.name}' reads {rel}, which is not among its deps in dvc.yaml: "
                              f"`dvc repro` will not rerun it when {rel} changes (add it to the deps)", stacklevel=2)
    return tuple(spec.inputs)


def used_params(params: Params, sections: tuple[str, ...]) -> dict[str, Any]:
    return {s: params.section(s).model_dump(mode="json") for s in sections}


def run_stage(spec: StageSpec, body: Callable[[StageContext], Optional[dict]],
              params: Optional[Params] = None) -> dict:
    repo = repo_root()
    params = params or load_params(repo / "params.yaml")
    input_paths = stage_inputs(repo, spec)
    producers = output_producers(repo)
    for rel in input_paths:
        if not (repo / rel).exists():
            hint = f" (run `dvc repro {producers[rel]}` first)" if rel in producers else ""
            raise DataError(f"stage '{spec.name}' needs {rel}, which does not exist{hint}")
    inputs = [describe_input(repo, rel, producers.get(rel)) for rel in input_paths]
    out = repo / spec.output
    remove_stale_temp_dirs(out)
    started = time.time()
    stage_params = used_params(params, spec.sections)
    tracking_uri = resolve_tracking_uri(repo, params.tracking.uri)
    check_tracking_server(tracking_uri)  # one clear line instead of MLflow's minutes of HTTP retries
    with StageRun(spec.name, params.tracking.experiment, tracking_uri, stage_params, inputs, repo) as run:
        with atomic_output_dir(out) as tmp:
            ctx = StageContext(spec, repo, params, tmp, run, inputs)
            metrics = body(ctx) or {}
            # Only what the inputs determine goes into the output, so an unchanged rerun keeps its DVC hash and
            # leaves everything downstream up to date; run ids, commit and times go to the run record below.
            write_json(tmp / MANIFEST, {**ctx.manifest, "lineage": {
                "stage": spec.name, "params": stage_params,
                "inputs": [{"path": r["path"], "stage": r["stage"], "digest": r["content_digest"]} for r in inputs]}})
        metrics = {**metrics, "stage_seconds": round(time.time() - started, 3)}
        metrics_file = repo / spec.metrics_path
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(metrics_file, metrics)
        run.log_metrics(metrics)
        run.log_artifact(out / MANIFEST)
        output_digest = content_digest(out)
        run.set_tags({OUTPUT_DIGEST_TAG: output_digest})
        record = {**ctx.record, "stage": spec.name, "output": spec.output, "output_digest": output_digest,
                  "mlflow_run_id": run.run_id, "mlflow_experiment": params.tracking.experiment,
                  "mlflow_parent_run_id": run.parent_run_id, "git_commit": run.tags.get("git.commit"),
                  "dvc_lock_digest": run.tags.get("dvc.lock.digest"), "params_digest": run.tags.get("params.digest"),
                  "upstream": {r["stage"]: r["run_id"] for r in inputs if r.get("stage")},
                  "started_unix": round(started), "finished_unix": round(time.time())}
        if (out / MODEL_SPEC_FILE).exists():  # a model-producing stage: PyTorch flavour + registry
            name, version = log_and_register_model(out, params.tracking.experiment, spec.name,
                                                   tags={"stage": spec.name, "git.commit": run.tags.get("git.commit")})
            run.set_tags({"registered_model.name": name, "registered_model.version": version})
            record["registered_model"] = {"name": name, "version": version}
        write_json(run_record_path(repo, spec.name), record)
    return metrics


def restore_metrics(repo: Path, stage: str) -> list[str]:
    """Put back the stage's metrics files that `dvc repro` deleted before a run that then failed.

    DVC removes every output, metrics included, before it runs a stage; metrics are `cache: false` (git tracks
    them), so `dvc checkout` cannot restore them. The copy recorded in dvc.lock is taken from DVC's cache (the run
    cache keeps one of every metrics file it saw) or from git HEAD when its digest matches; dvc.lock is unchanged
    after a failure, so the restored file makes `dvc status` show only what really changed. Returns what it restored.
    """
    restored = []
    for rel in entry_paths(dvc_stages(repo).get(stage, {}).get("metrics")):
        path, locked = Path(repo) / rel, dvc_locked_hash(repo, rel)
        if path.exists() or not locked:
            continue
        content = _cached_object(repo, locked) or _git_head_file(repo, rel)
        if content is not None and hashlib.md5(content).hexdigest() == locked:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            restored.append(rel)
    return restored


def _cached_object(repo: Path, md5: str) -> Optional[bytes]:
    try:
        from dvc.repo import Repo

        with Repo(str(repo)) as dvc_repo:
            path = Path(dvc_repo.cache.local.oid_to_path(md5))
        return path.read_bytes() if path.is_file() else None
    except Exception:  # no DVC repo or unreadable cache: fall back to git
        return None


def _git_head_file(repo: Path, rel: str) -> Optional[bytes]:
    result = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=repo, capture_output=True, timeout=30)
    return result.stdout if result.returncode == 0 else None


def read_manifest(path: Path) -> dict:
    f = Path(path) / MANIFEST
    if not f.exists():
        raise DataError(f"{path} has no {MANIFEST}")
    return read_json(f)


def run_stage_in_flow(spec: StageSpec, body: Callable[[StageContext], Optional[dict]]):
    """Call from inside a Prefect @flow: user errors become a Failed state with a one-line message
    (shown in the UI and printed by the CLI without a traceback); bugs propagate with their traceback."""
    from prefect import get_run_logger
    from prefect.states import Failed

    try:
        return run_stage(spec, body)
    except UserError as e:
        get_run_logger().error(f"{type(e).__name__}: {e}")
        return Failed(message=f"{e}", data=e)
