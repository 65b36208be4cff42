"""One training rank of a multi-process stage: `python -m torch.distributed.run ... -m components.training.worker
JOB RESULT` (started by components.training.recipe.run_job). JOB is a TrainJob as JSON; rank 0 logs metrics into
the stage's MLflow run and writes the outcome to RESULT."""
from __future__ import annotations

import dataclasses
import json
import sys

from components.training.distributed import world_info
from components.training.recipe import TrainJob, run_job_here


def main(job_path: str, result_path: str) -> int:
    job = TrainJob(**json.loads(open(job_path).read()))
    rank, _ = world_info()
    log_fn = None
    if rank == 0 and job.run_id:
        from components.tracking.metrics import run_metrics_logger

        log_fn = run_metrics_logger(job.tracking_uri, job.run_id)
    if rank != 0:
        job = dataclasses.replace(job, train={**job.train, "progress_bar": False})
    outcome = run_job_here(job, log_fn)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(dataclasses.asdict(outcome), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
