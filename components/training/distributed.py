"""Process groups and the one launcher (torchrun) for every training stage: one process, several on one node, or
several nodes.

- One process needs no launcher and opens no rendezvous port: its process group lives on an in-process store.
- Several processes run ``python -m components.training.launcher <torchrun args> -m components.training.worker JOB``:
  torchrun (static rendezvous, no restarts) with one change: node 0's rendezvous store listens only on the address
  it was given (MASTER_ADDR; 127.0.0.1 on one node), not on every interface as torch's store does by default.
- What differs per machine comes from the environment, never from params.yaml: the node rank (NODE_RANK, else
  Slurm's SLURM_NODEID) and the rendezvous endpoint (MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist

from components.errors import UserError
from components.io import free_port, world_info  # noqa: F401  (world_info: re-exported, the one rank lookup)

NODE_RANK_VARS = ("NODE_RANK", "SLURM_NODEID")  # first one set wins
TIMEOUT_ENV = "TRAIN_COLLECTIVE_TIMEOUT_S"  # set by launch_ranks for its ranks: how long a collective may wait
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def loopback_interface() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS)."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def interface_towards(host: str) -> str | None:
    """The name of this machine's network interface that reaches ``host`` (None when it cannot be told)."""
    import psutil

    try:
        family = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP connect sends nothing; it only picks the route
            local_ip = probe.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local_ip for a in addresses):
            return name
    return None


def _is_loopback(host: str) -> bool:
    try:
        return all(info[4][0].startswith("127.") or info[4][0] == "::1"
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except socket.gaierror:
        return False


def ensure_process_group_env() -> None:
    """Set single-process rank variables when absent, so DeepSpeed needs no launcher (nor mpi4py).

    Variables already set (e.g. by torchrun) are left untouched. No MASTER_PORT: one process needs no port.
    """
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if not torch.cuda.is_available():  # skip DeepSpeed's accelerator probe and its warning on CPU machines
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def collective_timeout(default_s: float = 1800.0) -> datetime.timedelta:
    """How long a collective waits for a peer before this rank gives up (launch_ranks passes distributed.timeout_s)."""
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, default_s)))


def init_process_group() -> None:
    """Join (or, for one process, create) the default process group; a no-op when one exists.

    Under a launcher this is DeepSpeed's ``init_distributed`` (env:// rendezvous through the launcher's store).
    A lone process gets a gloo/nccl group on an in-process HashStore bound to the loopback interface: no TCP
    store is opened, so nothing listens on the network.
    """
    if dist.is_available() and dist.is_initialized():
        return
    ensure_process_group_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    skip_deepspeed_cpu_shm_op()
    timeout = collective_timeout()
    if int(os.environ["WORLD_SIZE"]) == 1 and "MASTER_PORT" not in os.environ:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
        dist.init_process_group(get_accelerator().communication_backend_name(), store=dist.HashStore(),
                                rank=0, world_size=1, timeout=timeout)
    deepspeed.init_distributed(verbose=False, timeout=timeout)  # wraps an existing group, else env:// rendezvous


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; other ranks may pass None). Identity for one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_share(n: int) -> range:
    """The items of 0..n-1 this rank works on when a sampling job is split over the ranks: rank, rank + world, ...

    Strided, so every rank gets n // world or one more; with one process it is all of them. Merge the results by
    item index (:func:`merge_by_index`, or files named by index) and the output is the one process's output.
    """
    rank, world = world_info()
    return range(rank, n, world)


def merge_by_index(local: dict[int, Any]) -> list[Any]:
    """Every rank's ``{item index: result}`` merged into one list ordered by index, on every rank.

    With the per-item seeds fixed by index, this is the same list one process computing every item would give.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[dict[int, Any] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        local = {k: v for part in parts for k, v in (part or {}).items()}
    return [local[i] for i in sorted(local)]


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def node_rank(nodes: int) -> int:
    """This machine's node rank: 0 on one node, else NODE_RANK or SLURM_NODEID (a UserError when neither is set)."""
    if nodes == 1:
        return 0
    for var in NODE_RANK_VARS:
        if os.environ.get(var, "").strip():
            value = os.environ[var].strip()
            if not value.isdigit() or int(value) >= nodes:
                raise UserError(f"{var}={value} is not a node rank in 0..{nodes - 1} (distributed.nodes = {nodes})")
            return int(value)
    raise UserError(f"distributed.nodes = {nodes} needs this machine's node rank in NODE_RANK (or Slurm's "
                    f"SLURM_NODEID): 0 on the node that runs the stage, 1..{nodes - 1} on the others")


def rendezvous_endpoint(nodes: int) -> tuple[str, int]:
    """(address, port) where the ranks meet: 127.0.0.1 and a free port on one node, else MASTER_ADDR:MASTER_PORT."""
    if nodes == 1:
        return "127.0.0.1", free_port()
    addr, port = os.environ.get("MASTER_ADDR", "").strip(), os.environ.get("MASTER_PORT", "").strip()
    if not addr or not port.isdigit():
        raise UserError(f"distributed.nodes = {nodes} needs the rendezvous endpoint in MASTER_ADDR and MASTER_PORT "
                        f"(node 0's address on the network the nodes share, and a free port), got "
                        f"MASTER_ADDR={addr!r} MASTER_PORT={port!r}")
    return addr, int(port)


def launcher_command(processes_per_node: int, argv: list[str], nodes: int = 1) -> list[str]:
    """The torchrun command line (through this module's store-binding wrapper) that runs ``argv`` on every rank."""
    addr, port = rendezvous_endpoint(nodes)
    return [
        sys.executable, "-m", "components.training.launcher",
        "--nnodes", str(nodes), "--nproc_per_node", str(processes_per_node), "--node_rank", str(node_rank(nodes)),
        "--rdzv_backend", "static", "--master_addr", addr, "--master_port", str(port),
        "--max_restarts", "0", "--monitor_interval", "1",
        *argv,
    ]


def launch_ranks(n: int, argv: list[str], env: dict[str, str] | None = None, *, nodes: int = 1,
                 timeout_s: float = 300.0) -> int:
    """Run ``argv`` (a script path and its args, or ``["-m", module, ...]``) as ``n`` ranks on this node.

    With ``nodes > 1`` this node's ranks join the others at MASTER_ADDR:MASTER_PORT (see :func:`node_rank`). On
    CPU the ranks talk over gloo. When one rank dies, torchrun stops the others (no restarts); a rank blocked on
    a dead peer of another node gives up after ``timeout_s``. Returns the launcher's exit code.
    """
    if n < 1:
        raise ValueError(f"number of ranks must be >= 1, got n={n}")
    if not argv:
        raise ValueError("argv must name the script (or -m module) to run, got argv=[]")
    command = launcher_command(n, argv, nodes)
    child_env = dict(os.environ)
    # Per-rank variables from an enclosing single-process setup would confuse the launcher's workers.
    for key in _RANK_VARS:
        child_env.pop(key, None)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env[TIMEOUT_ENV] = str(timeout_s)
    master_addr = command[command.index("--master_addr") + 1]
    # The ranks' own sockets (gloo, NCCL) bind the interface that reaches node 0: loopback on one machine, else the
    # one towards MASTER_ADDR, unless the user named one.
    interface = loopback_interface() if nodes == 1 or _is_loopback(master_addr) else interface_towards(master_addr)
    if interface:
        child_env.setdefault("GLOO_SOCKET_IFNAME", interface)
        child_env.setdefault("NCCL_SOCKET_IFNAME", interface)
    if env:
        child_env.update(env)
    return subprocess.run(command, env=child_env, check=False, preexec_fn=_die_with_parent).returncode


def _die_with_parent() -> None:
    """In a launched child (before exec): get SIGTERM when the launching process dies, even by SIGKILL, so the
    ranks never outlive their stage (Linux PR_SET_PDEATHSIG; a no-op elsewhere)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def skip_deepspeed_cpu_shm_op() -> None:
    """Keep DeepSpeed on plain gloo on CPU instead of JIT-compiling its shared-memory comm op.

    DeepSpeed's CPU backend compiles ``deepspeed_shm_comm`` (about 80 s with g++ on a fresh machine) the
    first time a process group is created. For this project's small models gloo is fast enough, and that
    compile would eat most of a CI run or the demo's time budget. Call before ``deepspeed.init_distributed``.
    """
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
