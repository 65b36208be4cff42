"""`python -m flows.join`: on every node but node 0 of a multi-node run, start this node's training ranks and let
them join the stage that node 0 runs (`dvc repro <stage>` there). README "Scaling out".

Each node runs the same checkout at the same path with the same params.yaml and data; node 0's rank 0 sends the
training job to every rank, logs to MLflow and writes the outputs. This node's rank and the rendezvous endpoint come
from the environment: NODE_RANK (or SLURM_NODEID), MASTER_ADDR, MASTER_PORT.
"""
from __future__ import annotations

import sys

from components.config import load_params
from components.errors import UserError
from components.training.distributed import launch_ranks, node_rank


def main() -> int:
    try:
        d = load_params("params.yaml").distributed
        if d.nodes == 1:
            raise UserError("distributed.nodes is 1: there is nothing to join (run the stage itself)")
        if node_rank(d.nodes) == 0:
            raise UserError("this is node 0 (NODE_RANK/SLURM_NODEID = 0): run the stage here (dvc repro <stage>), "
                            "and `python -m flows.join` on the other nodes")
        code = launch_ranks(d.processes_per_node, ["-m", "components.training.worker", "-"], nodes=d.nodes,
                            timeout_s=d.timeout_s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
