"""The stage contract of DESIGN.md, implemented once; flows/stage.py runs it inside a Prefect flow.

`run_stage(spec, body, repo)`:
1. validates params.yaml (typed schema; a bad value stops the stage naming the key, nothing written);
2. checks its inputs (the dvc.yaml deps another stage produces) exist and finds the run that produced each;
3. opens the stage's MLflow run (tags: stage, upstream.<stage>.run_id, git.commit, dvc.lock.digest, params.digest);
4. lets `body(ctx)` write into a temp dir that becomes the output only on success (atomic);
5. writes manifest.json into the output: only what the inputs determine (stage, params used, input digests), so
   an unchanged rerun gives a byte-identical output; writes the metrics file; tags the run with the output's
   content digest (`output.digest`) and writes the run record data/<stage>/run.json (run id, commit, digests,
   times, upstream runs): a sidecar DVC does not hash, which is how a downstream stage finds the producing run.
The orchestrator's side (its run id in the stage lock, closing a run a killed holder left open) comes in as
arguments, so nothing here imports Prefect.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from components.config import Params, load_params
from components.errors import DataError, UserError
from components.io import (HolderLock, LockHeld, atomic_output_dir, describe_holder, file_records, read_json,
                           remove_stale_temp_dirs, verify_file_records, write_json)
from components.tracking.lineage import (MANIFEST, OUTPUT_DIGEST_TAG, StageRun, content_digest, describe_input,
                                         dvc_stages, end_abandoned_run, entry_paths,
                                         output_producers, resolve_tracking_uri, run_record_path)
from components.tracking.registry import MODEL_SPEC_FILE, check_tracking_server, log_and_register_model

SettleFlowRun = Callable[[str, bool, str], bool]  # (flow run id, completed, note) -> whether it was still open


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

    def use_checkpoint_dir(self, root: Path) -> Path:
        """Record the stage's checkpoint dir (run tag and manifest; `clean-checkpoints` keeps it); returns it."""
        self.run.set_tags({"checkpoint_dir": root.relative_to(self.repo)})
        self.manifest["checkpoint_dir"] = str(root.relative_to(self.repo))
        return root


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


VERSION_TAGS = ("stage", "git.commit", "dvc.lock.digest", "params.digest")  # + upstream.<stage>.run_id


def check_no_run_ids(stage: str, manifest: dict, run_ids: list[str]) -> None:
    """A run id in the output would change its hash on every rerun (and make everything downstream stale): a bug
    in the stage body, which should put run-specific facts into `ctx.record` (the run record) instead."""
    text = json.dumps(manifest, default=str)
    leaked = sorted({run_id for run_id in run_ids if run_id and run_id in text})
    if leaked:
        raise RuntimeError(f"stage '{stage}' put MLflow run id(s) {', '.join(leaked)} into its output manifest; "
                           "record them in ctx.record (data/<stage>/run.json) so the output hash stays stable")


def headline_numbers(metrics: dict, limit: int = 20) -> dict[str, float]:
    """The stage's top-level numeric metrics (what a registered version carries as tags)."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return dict(list(numbers.items())[:limit])


def used_params(params: Params, sections: tuple[str, ...]) -> dict[str, Any]:
    return {s: params.section(s).model_dump(mode="json") for s in sections}


def run_stage(spec: StageSpec, body: Callable[[StageContext], Optional[dict]], repo: Path,
              params: Optional[Params] = None, flow_run_id: Optional[str] = None,
              settle_flow_run: Optional[SettleFlowRun] = None) -> dict:
    """`flow_run_id`: the orchestrator's run of this stage (recorded in the stage lock); `settle_flow_run`: how to
    close the one a killed previous holder left open."""
    params = params or load_params(repo / "params.yaml")
    input_paths = stage_inputs(repo, spec)
    producers = output_producers(repo)
    check_inputs(repo, spec.name, input_paths, producers)
    check_writable(repo, spec)
    out = repo / spec.output
    stage_params = used_params(params, spec.sections)
    tracking_uri = resolve_tracking_uri(repo, params.tracking.uri)
    check_tracking_server(tracking_uri)  # one clear line instead of MLflow's minutes of HTTP retries
    with stage_lock(repo, spec, tracking_uri, flow_run_id) as lock:
        settle_previous_run(spec.name, lock.previous, settle_flow_run)
        inputs = [describe_input(repo, rel, producers.get(rel)) for rel in input_paths]
        remove_stale_temp_dirs(out)
        started = time.time()
        with StageRun(spec.name, params.tracking.experiment, tracking_uri, stage_params, inputs, repo) as run:
            lock.update(mlflow_run_id=run.run_id)
            run.set_tags({"host": lock.record["host"], "pid": lock.record["pid"]})
            with atomic_output_dir(out) as tmp:
                ctx = StageContext(spec, repo, params, tmp, run, inputs)
                metrics = body(ctx) or {}
                # Only what the inputs determine goes into the output, so an unchanged rerun keeps its DVC hash and
                # leaves everything downstream up to date; run ids, commit and times go to the run record below.
                # `files` (size + md5 of each file) lets every reader check the output is intact (check_inputs).
                manifest = {**ctx.manifest, FILES_KEY: file_records(tmp), "lineage": {
                    "stage": spec.name, "params": stage_params,
                    "inputs": [{"path": r["path"], "stage": r["stage"], "digest": r["content_digest"]} for r in inputs]}}
                check_no_run_ids(spec.name, manifest, [run.run_id, *run.child_run_ids])
                write_json(tmp / MANIFEST, manifest)
            metrics = {**metrics, "stage_seconds": round(time.time() - started, 3)}
            metrics_file = repo / spec.metrics_path
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(metrics_file, metrics)
            output_digest = content_digest(out)
            record = {**ctx.record, "stage": spec.name, "output": spec.output, "output_digest": output_digest,
                      "mlflow_run_id": run.run_id, "mlflow_experiment": params.tracking.experiment,
                      "mlflow_parent_run_id": run.parent_run_id, "git_commit": run.tags.get("git.commit"),
                      "dvc_lock_digest": run.tags.get("dvc.lock.digest"), "params_digest": run.tags.get("params.digest"),
                      "upstream": {r["stage"]: r["run_id"] for r in inputs if r.get("stage")},
                      "started_unix": round(started), "finished_unix": round(time.time()),
                      "checkpoint_dir": run.tags.get("checkpoint_dir")}  # kept by `clean-checkpoints`
            lock.update(outcome="completed")  # the work is done: a tracking outage from here on must not undo it
            try:
                check_tracking_server(tracking_uri)  # a dead server: fail in seconds, not after minutes of retries
                run.log_metrics(metrics)
                run.log_artifact(out / MANIFEST)
                run.set_tags({OUTPUT_DIGEST_TAG: output_digest})
                if (out / MODEL_SPEC_FILE).exists():  # a model-producing stage: a sampling model in the registry
                    lineage_tags = {k: v for k, v in run.tags.items() if k in VERSION_TAGS or k.startswith("upstream.")}
                    name, version, reused = log_and_register_model(
                        out, params.tracking.experiment, spec.name, run.run_id,
                        tags={**lineage_tags, OUTPUT_DIGEST_TAG: output_digest}, metrics=headline_numbers(metrics))
                    run.set_tags({"registered_model.name": name, "registered_model.version": version,
                                  "registered_model.reused": reused})
                    record["registered_model"] = {"name": name, "version": version, "reused": reused}
            except Exception as e:  # noqa: BLE001  (any MLflow/HTTP failure: the outputs are already in place)
                if not tracking_uri.startswith(("http://", "https://")):
                    raise
                warn(f"stage '{spec.name}' completed and its outputs are in place, but the MLflow server at "
                     f"{tracking_uri} failed while recording them ({type(e).__name__}); run "
                     f"{run.run_id} lacks its final metrics/model and is closed when the stage next runs")
                run.abandon()
            write_json(run_record_path(repo, spec.name), record)
        if getattr(run, "ended", False):
            lock.update(mlflow_run_ended=True)  # the next run need not open this run's store to settle it
    return metrics


FILES_KEY = "files"  # manifest entry: {relative path: {"size", "md5"}} of every file of the output
LOCK_DIR = "checkpoints/.locks"


def check_inputs(repo: Path, stage: str, input_paths, producers: dict[str, str], missing_ok: bool = False) -> None:
    """Every input exists and, when its manifest lists its files, matches them (sizes, then md5): a truncated
    shard or a corrupt model stops the stage at once with one line naming the file."""
    for rel in input_paths:
        path = repo / rel
        producer = producers.get(rel)
        if not path.exists():
            if missing_ok:
                continue
            hint = f" (run `dvc repro {producer}` first)" if producer else ""
            raise DataError(f"stage '{stage}' needs {rel}, which does not exist{hint}")
        if path.resolve() in _VERIFIED:
            continue
        manifest_file = path / MANIFEST
        records = read_json(manifest_file).get(FILES_KEY) if manifest_file.is_file() else None
        if records:
            problem = verify_file_records(path, records)
            if problem:
                rebuild = f"`dvc repro -f {producer}`" if producer else "its producing stage"
                raise DataError(f"{problem}; restore it with `dvc checkout --force {rel}` or rebuild it with {rebuild}")
        _VERIFIED.add(path.resolve())


_VERIFIED: set[Path] = set()  # inputs already checked by this process


def check_declared_inputs(repo: Path, stage: str) -> None:
    """Check the stage's dvc.yaml inputs that exist, before Prefect, MLflow and torch are imported: a damaged
    input is reported in about a second instead of after the stage's set-up."""
    producers = output_producers(repo)
    deps = [d for d in declared_deps(repo, stage) if d in producers and producers[d] != stage]
    check_inputs(repo, stage, deps, producers, missing_ok=True)


def check_writable(repo: Path, spec: StageSpec) -> None:
    """Fail before any work if the output, metrics or checkpoint location cannot be written (read-only data/...)."""
    for rel in (Path(spec.output).parent, Path(spec.metrics_path).parent, Path(LOCK_DIR)):
        target = repo / rel
        existing = next(p for p in (target, *target.parents) if p.exists())
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
                pass
        except OSError as e:
            raise DataError(f"stage '{spec.name}' cannot write to {existing} ({e.strerror}); it writes "
                            f"{spec.output}, {spec.metrics_path} and checkpoints/{spec.name}") from None


@contextlib.contextmanager
def stage_lock(repo: Path, spec: StageSpec, tracking_uri: str, flow_run_id: Optional[str] = None
               ) -> Iterator[HolderLock]:
    """One process per stage and repo at a time: it owns checkpoints/<stage>/ and the stage's output.

    The lock names its holder (pid, host, start time, MLflow run, Prefect flow run); a second run of the stage
    stops with one line naming it instead of writing the same checkpoint directory.
    """
    lock = HolderLock(repo / LOCK_DIR / f"{spec.name}.lock", stage=spec.name, tracking_uri=tracking_uri,
                      prefect_flow_run_id=flow_run_id)
    try:
        lock.__enter__()
    except LockHeld as e:
        raise UserError(f"stage '{spec.name}' is already running: {describe_holder(e.holder)}; a second run "
                        f"would write the same checkpoints/{spec.name} and {spec.output} (lock {e.path}); "
                        "wait for it or stop it") from None
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


def settle_previous_run(stage: str, previous: dict, settle_flow_run: Optional[SettleFlowRun] = None) -> None:
    """Close the MLflow and Prefect runs the previous holder of the stage lock left open.

    We hold the lock, so that process is gone. If it died (kill -9, OOM killer) its runs still say RUNNING: the
    MLflow run (and its children) become FAILED and the Prefect flow run Crashed. If its work had completed and
    only a server outage kept it from closing them, they become FINISHED / Completed.
    """
    if not previous:
        return
    completed = previous.get("outcome") == "completed"
    who = describe_holder(previous)
    note = (f"the stage completed but its process ({who}) could not close this run (server unreachable)"
            if completed else f"the stage process ({who}) died without closing this run (killed: kill -9, OOM?)")
    closed = []
    if previous.get("mlflow_run_id") and previous.get("tracking_uri") and not previous.get("mlflow_run_ended"):
        try:
            # A server that has gone since (a benchmark's, a colleague's) fails in seconds, not minutes of retries.
            check_tracking_server(previous["tracking_uri"])
            if end_abandoned_run(previous["tracking_uri"], previous["mlflow_run_id"],
                                 "FINISHED" if completed else "FAILED", note):
                closed.append(f"MLflow run {previous['mlflow_run_id']} -> {'FINISHED' if completed else 'FAILED'}")
        except Exception as e:  # noqa: BLE001  (best effort: never stop a stage over an old run)
            warn(f"could not close the previous '{stage}' MLflow run {previous['mlflow_run_id']}: {e}")
    if previous.get("prefect_flow_run_id") and settle_flow_run:
        try:
            if settle_flow_run(previous["prefect_flow_run_id"], completed, note):
                closed.append(f"Prefect flow run {previous['prefect_flow_run_id']} -> "
                              f"{'Completed' if completed else 'Crashed'}")
        except Exception as e:  # noqa: BLE001
            warn(f"could not close the previous '{stage}' Prefect flow run {previous['prefect_flow_run_id']}: "
                 f"{type(e).__name__}: {e}")
    if closed:
        warn(f"the previous '{stage}' run ({who}) {'could not report its end' if completed else 'was killed'}: "
             + "; ".join(closed))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
