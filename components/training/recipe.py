"""The one training recipe. Every training stage (teacher, reflow, progressive, consistency, dpo) describes its run
as a `TrainJob`: which task, the task's JSON-able inputs, the Trainer's settings, where to checkpoint and export.
`run_job` runs it in this process, or as the ranks of `python -m components.training.worker JOB` through the one
launcher (`distributed.processes_per_node` x `distributed.nodes`); every rank runs the same `run_job_here`, so
every training stage is made multi-process by the `distributed` settings alone.

A task builder, named in the job as "module:function" (`task_ref`), turns a job's `args` into a `TrainingTask`: the
model, the loss, the batches and the checkpoint fingerprint. `train` runs the one Trainer on it: resume from the checkpoint dir, fit, export the EMA.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from components.config import RESUMABLE_SETTINGS, TrainConfig
from components.errors import UserError
from components.training.distributed import launch_ranks, world_info
from components.training.trainer import Trainer

LogFn = Callable[[dict, int], None]

@dataclass
class TrainingTask:
    """What the Trainer needs: the module it trains, its loss, this rank's micro-batches, the checkpoint
    fingerprint, and optionally how the EMA state becomes the exported weights (default: as it is)."""

    model: nn.Module
    loss_fn: Callable
    batches: Iterable[dict]
    fingerprint: dict
    export_state: Optional[Callable[[dict], dict]] = None


@dataclass
class TrainOutcome:
    steps: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0  # the step training resumed from (0: a fresh start)


@dataclass
class TrainJob:
    """One training run, JSON-able so that launched ranks can read it from a file."""

    task: str  # the task builder, "module:function" (task_ref)
    args: dict[str, Any]  # the task's inputs (paths as strings, specs, objective settings)
    train: dict[str, Any]  # TrainConfig fields
    checkpoint_dir: str
    export: str  # the exported (EMA) weights file
    processes_per_node: int = 1  # ranks per machine (the `distributed` section)
    nodes: int = 1
    timeout_s: int = 300  # a collective waiting this long on a dead rank stops the job
    torch_threads: int = 0  # 0: auto (set_torch_threads)
    tracking_uri: Optional[str] = None  # launched ranks: rank 0 logs metrics into this MLflow run
    run_id: Optional[str] = None


def fingerprint(*parts: Any) -> str:
    """Short hash of JSON-able parts: names a checkpoint or work directory (same inputs -> same directory)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.md5(blob).hexdigest()[:12]


def checkpoint_dir(root: Path | str, config: TrainConfig, *identity: Any) -> Path:
    """`root/<fingerprint>` of what identifies the run (model, data, objective: `identity`) and the settings that
    change what it computes; RESUMABLE_SETTINGS (steps, ...) are left out, so raising `steps` resumes."""
    settings = config.model_dump(mode="json", include=set(TrainConfig.model_fields) - set(RESUMABLE_SETTINGS))
    return Path(root) / fingerprint(*identity, settings)


def set_torch_threads(spec: dict[str, Any], requested: int = 0, sampling: bool = False) -> int:
    """Intra-op threads for this process running the model of `spec`: `requested`, or for 0 all cores (its share of
    them on a launched rank), except one thread for training MLPs (a batch-512 MLP step is dominated by thread
    synchronisation, which collapses when cores are shared). Sampling stages push batches of thousands through an
    MLP: there 2 threads are 1.7x one."""
    small = spec["network"]["kind"] == "mlp" and not sampling
    # Launched ranks share the machine's cores (LOCAL_WORLD_SIZE: ranks on this node).
    cores = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    threads = requested or (1 if small else cores)
    torch.set_num_threads(threads)
    return threads


def rank_seed(seed: int) -> int:
    """The seed of this rank's shuffle of in-memory data (couplings, preference pairs): `seed` on rank 0 (one process:
    unchanged), offset on the others, so ranks draw independent batches instead of the same ones."""
    return seed + 1000 * world_info()[0]


def train(task: TrainingTask, config: TrainConfig, checkpoint_dir: Path | str, export: Path | str,
          log_fn: Optional[LogFn] = None) -> TrainOutcome:
    """The one Trainer on `task`: resume from `checkpoint_dir`, fit `config.steps` steps, export the EMA weights
    (rank 0) to `export`. Checkpoint and non-finite-loss errors are user errors (one line, no traceback)."""
    trainer = Trainer(task.model, task.loss_fn, config, checkpoint_dir, log_fn=log_fn, fingerprint=task.fingerprint)
    found = trainer.latest_checkpoint()
    resumed_from = int(found[1]["step"]) if found else 0
    if resumed_from and trainer.rank == 0:
        print(f"resuming from step {resumed_from} (checkpoint in {checkpoint_dir})", file=sys.stderr)
    result = trainer.fit(task.batches)
    if task.export_state is None:
        trainer.export(export)
    elif trainer.rank == 0:
        export = Path(export)
        export.parent.mkdir(parents=True, exist_ok=True)
        tmp = export.with_name(f".{export.name}.tmp")
        torch.save(task.export_state(trainer.ema_state_dict()), tmp)
        os.replace(tmp, export)
    return TrainOutcome(result.steps, result.final_loss, result.history, resumed_from)


TaskBuilder = Callable[[dict, TrainConfig, int, int], TrainingTask]  # (args, config, world_size, threads)


def task_ref(builder: Callable) -> str:
    """How a job names a task builder (or a sampling job's function): "module:function"."""
    return f"{builder.__module__}:{builder.__name__}"


def resolve_ref(ref: str) -> Callable:
    """The function a job names as "module:function" (task_ref): imported only where the job runs, so the worker
    does not import (and every stage does not depend on) the code of every kind of job."""
    module, _, function = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"unknown job function {ref!r} (expected module:function)") from None


def build_task(job: TrainJob, config: TrainConfig, world_size: int) -> TrainingTask:
    return resolve_ref(job.task)(job.args, config, world_size, job.torch_threads)


def run_job_here(job: TrainJob, log_fn: Optional[LogFn] = None) -> TrainOutcome:
    """Run `job` in this process (one rank of a launch, or the whole run)."""
    _, world = world_info()
    config = TrainConfig(**job.train)
    torch.manual_seed(config.seed)  # a model built from scratch starts from the same weights in every run
    task = build_task(job, config, world)
    return train(task, config, job.checkpoint_dir, job.export, log_fn=log_fn)


def run_job(job: TrainJob, log_fn: Optional[LogFn] = None) -> TrainOutcome:
    """Run `job` here (one process, metrics to `log_fn`) or as `processes_per_node` ranks on each of `nodes`
    machines (this is node 0; the others run `python -m flows.join`; rank 0 logs into the MLflow run
    `job.run_id`); returns rank 0's outcome either way."""
    if job.processes_per_node * job.nodes == 1:
        return run_job_here(job, log_fn)
    work = Path(job.checkpoint_dir)
    result_file = work / "outcome.json"
    result_file.unlink(missing_ok=True)
    launch_worker({"job": dataclasses.asdict(job), "result": str(result_file)}, work, job.processes_per_node,
                  job.nodes, job.timeout_s, f"training ranks of {job.task}")
    outcome = TrainOutcome(**json.loads(result_file.read_text()))
    result_file.unlink()
    return outcome


def launch_worker(document: dict[str, Any], work: Path, processes_per_node: int, nodes: int, timeout_s: float,
                  what: str) -> None:
    """Run `python -m components.training.worker` on the ranks with `document` as its job file (in `work`). A user
    error raised on a rank (bad data, a checkpoint to clean) comes back as that one-line error; any other failure
    as a RuntimeError naming `what`."""
    work.mkdir(parents=True, exist_ok=True)
    job_file, error_file = work / "job.json", work / "error.txt"
    error_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**document, "error": str(error_file)}))
    try:
        code = launch_ranks(processes_per_node, ["-m", "components.training.worker", str(job_file)], nodes=nodes,
                            timeout_s=timeout_s)
    finally:
        job_file.unlink(missing_ok=True)
    if code != 0:
        if error_file.exists():
            message = error_file.read_text()
            error_file.unlink()
            raise UserError(message)
        raise RuntimeError(f"{what} exited with code {code} (see their output above)")


def training_job(task: TaskBuilder, args: dict[str, Any], params, config: TrainConfig, checkpoint_dir: Path | str,
                 export: Path | str, run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                 distributed=None) -> TrainJob:
    """A TrainJob of a stage running the task builder `task`: `params` is its section (a TrainParams:
    torch_threads), `config` the Trainer's settings (usually `params.train_config()`), `run_id` the MLflow run
    launched ranks log into, `distributed` the `distributed` section (None: one process)."""
    ranks = {} if distributed is None else {"processes_per_node": distributed.processes_per_node,
                                            "nodes": distributed.nodes, "timeout_s": distributed.timeout_s}
    return TrainJob(task_ref(task), args, config.model_dump(mode="json"), str(checkpoint_dir), str(export),
                    torch_threads=params.torch_threads, tracking_uri=tracking_uri, run_id=run_id, **ranks)
