"""The stage contract of DESIGN.md, implemented once and used by every stage flow.

A stage flow is `run_stage(SPEC, body)` inside a Prefect @flow. `run_stage`:
1. validates params.yaml (typed schema; a bad value stops the stage naming the key, nothing written);
2. checks its inputs exist and reads their lineage (dvc.lock digest, producing MLflow run);
3. opens the stage's MLflow run (tags: stage, upstream.<stage>.run_id, git.commit, dvc.lock.digest);
4. lets `body(ctx)` write into a temp dir that becomes the output only on success (atomic);
5. writes manifest.json (stage, run id, commit, params used, inputs) into the output and the metrics file.
"""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from components.config import Params, load_params
from components.errors import DataError, UserError
from components.io import atomic_output_dir, read_json, remove_stale_temp_dirs, write_json
from components.tracking.lineage import (MANIFEST, StageRun, describe_input, dvc_lock_digest, git_commit,
                                         resolve_tracking_uri)
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
    manifest: dict = field(default_factory=dict)  # body adds stage-specific entries here

    def path(self, rel: str) -> Path:
        return self.repo / rel

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.run.log_metrics(metrics, step=step)


def dvc_stages(repo: Path) -> dict[str, dict]:
    """The `stages` of the repo's dvc.yaml as written (a plain YAML read: no DVC import in a stage process)."""
    path = Path(repo) / "dvc.yaml"
    return _read_stages(str(path), path.stat().st_mtime_ns) if path.exists() else {}


@functools.lru_cache(maxsize=4)
def _read_stages(path: str, mtime_ns: int) -> dict[str, dict]:  # mtime_ns: part of the cache key only
    return (yaml.safe_load(Path(path).read_text()) or {}).get("stages") or {}


def _entry_paths(entries) -> list[str]:
    return [(e if isinstance(e, str) else next(iter(e))).rstrip("/") for e in entries or []]


def declared_deps(repo: Path, stage: str) -> list[str]:
    """The deps of `stage` in dvc.yaml (paths, in order); empty when the stage is not declared."""
    return _entry_paths(dvc_stages(repo).get(stage, {}).get("deps"))


def output_producers(repo: Path) -> dict[str, str]:
    """Every output path of dvc.yaml (outs, metrics, plots) -> the stage that writes it."""
    return {path: name for name, stage in dvc_stages(repo).items()
            for key in ("outs", "metrics", "plots") for path in _entry_paths(stage.get(key))}


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
    for rel in input_paths:
        if not (repo / rel).exists():
            producer = output_producers(repo).get(rel)
            hint = f" (run `dvc repro {producer}` first)" if producer else ""
            raise DataError(f"stage '{spec.name}' needs {rel}, which does not exist{hint}")
    inputs = [describe_input(repo, rel) for rel in input_paths]
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
            manifest = {**ctx.manifest, "lineage": {
                "stage": spec.name,
                "mlflow_run_id": run.run_id,
                "mlflow_experiment": params.tracking.experiment,
                "mlflow_parent_run_id": run.parent_run_id,
                "git_commit": run.tags.get("git.commit"),
                "dvc_lock_digest": dvc_lock_digest(repo),
                "params": stage_params,
                "inputs": inputs,
                "created_unix": round(started),
            }}
            write_json(tmp / MANIFEST, manifest)
        metrics = {**metrics, "stage_seconds": round(time.time() - started, 3)}
        metrics_file = repo / spec.metrics_path
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(metrics_file, metrics)
        run.log_metrics(metrics)
        run.log_artifact(out / MANIFEST)
        if (out / MODEL_SPEC_FILE).exists():  # a model-producing stage: PyTorch flavour + registry
            name, version = log_and_register_model(out, params.tracking.experiment, spec.name,
                                                   tags={"stage": spec.name, "git.commit": run.tags.get("git.commit")})
            run.set_tags({"registered_model.name": name, "registered_model.version": version})
    return metrics


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
