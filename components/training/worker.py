"""One rank of a multi-process stage: `python -m torch.distributed.run ... -m components.training.worker JOB`
(started by components.training.recipe.run_job or reflow_training.couplings_on_ranks, and by `python -m flows.join`
on the other nodes with JOB "-").

JOB is a JSON file: {"job": TrainJob, "result": path} for training, where rank 0 logs metrics into the stage's MLflow
run and writes the outcome; {"call": "module:function", "job": {...}} for a sampling job (the couplings solve), where
each rank runs that function on the arguments. Only rank 0 reads it and sends the job to the others, so the ranks of other nodes need no copy of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys

from components.errors import UserError
from components.training.distributed import broadcast_from_rank0, init_process_group, world_info
from components.training.recipe import TrainJob, resolve_ref, run_job_here


def main(job_path: str) -> int:
    init_process_group()
    rank, _ = world_info()
    document = broadcast_from_rank0(json.loads(open(job_path).read()) if rank == 0 else None)
    try:
        return run_document(document, rank)
    except UserError as e:  # one line here, and the message back to the stage (launch_worker re-raises it)
        print(f"error: {e}", file=sys.stderr)
        if document.get("error"):
            with contextlib.suppress(OSError):
                with open(document["error"], "w") as f:
                    f.write(str(e))
        return 2


def run_document(document: dict, rank: int) -> int:
    if "call" in document:  # a sampling job: every rank runs the named function on the arguments
        resolve_ref(document["call"])(document["job"])
        return 0
    job = TrainJob(**document["job"])
    log_fn = None
    if rank == 0 and job.run_id:
        from components.tracking.metrics import run_metrics_logger

        log_fn = run_metrics_logger(job.tracking_uri, job.run_id)
    if rank != 0:
        job = dataclasses.replace(job, train={**job.train, "progress_bar": False})
    outcome = run_job_here(job, log_fn)
    if rank == 0:
        with open(document["result"], "w") as f:
            json.dump(dataclasses.asdict(outcome), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
