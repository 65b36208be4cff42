"""One training rank of a multi-process stage: `python -m torch.distributed.run ... -m flows.train_worker JOB`.

The stage flow writes JOB (a JSON file: what to train, where to export, which MLflow run to log into) and
launches N ranks of this module; rank 0 logs metrics into the stage's MLflow run. Only rank 0 reads JOB and
sends it to the others, so the ranks of other nodes (`python -m flows.join`) need no copy of it (JOB is "-").
"""
from __future__ import annotations

import json
import sys

from components.training.denoiser_training import train_denoiser
from components.training.distributed import broadcast_from_rank0, init_process_group, world_info


def main(job_path: str) -> int:
    init_process_group()
    rank, _ = world_info()
    job = broadcast_from_rank0(json.loads(open(job_path).read()) if rank == 0 else None)
    log_fn = None
    if rank == 0 and job.get("run_id"):
        from components.tracking.metrics import run_metrics_logger

        log_fn = run_metrics_logger(job["tracking_uri"], job["run_id"])
    result, resumed_from = train_denoiser(job["spec"], job["objective"], job["shards"], job["train"], job["checkpoint_dir"],
                            job["export"], log_fn=log_fn, progress=rank == 0,
                            torch_threads=job.get("torch_threads", 0))
    if rank == 0:
        with open(job["result"], "w") as f:
            json.dump({"steps": result.steps, "final_loss": result.final_loss, "history": result.history,
                       "resumed_from": resumed_from}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
