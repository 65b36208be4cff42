"""Process-group helpers: single-process defaults without a launcher, and a local multi-rank launcher."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

from components.io import free_port


def ensure_process_group_env() -> None:
    """Set single-process rendezvous variables when absent, so DeepSpeed needs no launcher (nor mpi4py).

    Variables already set (e.g. by torchrun) are left untouched.
    """
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if not torch.cuda.is_available():  # skip DeepSpeed's accelerator probe and its warning on CPU machines
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def world_info() -> tuple[int, int]:
    """Return (rank, world_size): from the live process group if any, else from the environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def launch_ranks(n: int, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``argv`` (a script path and its args, or ``["-m", module, ...]``) as ``n`` local ranks.

    Uses ``python -m torch.distributed.run --nproc_per_node n`` on 127.0.0.1 with a free port; on CPU the
    ranks talk over gloo. Returns the launcher's exit code (non-zero if any rank failed).
    """
    if n < 1:
        raise ValueError(f"number of ranks must be >= 1, got n={n}")
    if not argv:
        raise ValueError("argv must name the script (or -m module) to run, got argv=[]")
    child_env = dict(os.environ)
    # Per-rank variables from an enclosing single-process setup would confuse the launcher's workers.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        child_env.pop(key, None)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    if env:
        child_env.update(env)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(n),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        *argv,
    ]
    return subprocess.run(command, env=child_env, check=False).returncode


def skip_deepspeed_cpu_shm_op() -> None:
    """Keep DeepSpeed on plain gloo on CPU instead of JIT-compiling its shared-memory comm op.

    DeepSpeed's CPU backend compiles ``deepspeed_shm_comm`` (about 80 s with g++ on a fresh machine) the
    first time a process group is created. For this project's small models gloo is fast enough, and that
    compile would eat most of a CI run or the demo's time budget. Call before ``deepspeed.init_distributed``.
    """
    import torch

    if torch.cuda.is_available():
        return
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
