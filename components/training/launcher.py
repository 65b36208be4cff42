"""The one launcher of multi-process training: torchrun, with node 0's rendezvous store bound to the address it
was given (MASTER_ADDR, 127.0.0.1 on one node) instead of every interface, which is what torch's store does.

Run through :func:`components.training.distributed.launch_ranks`, which builds the command line:
``python -m components.training.launcher --nnodes N --nproc_per_node P --node_rank R --master_addr A ... -m MODULE``.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import torch.distributed as dist


def _store_listening_only_on(host: str, port: int, *args: Any, **kwargs: Any) -> dist.TCPStore:
    """torch's TCPStore, except that the server binds ``host`` itself rather than every interface."""
    is_master = kwargs.get("is_master", args[1] if len(args) > 1 else False)
    if is_master:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        _LISTENERS.append(sock)  # the store serves on this socket's fd: keep it open for the agent's lifetime
        kwargs["master_listen_fd"] = sock.fileno()
    return dist.TCPStore(host, port, *args, **kwargs)


_LISTENERS: list[socket.socket] = []


def run_launcher(argv: list[str]) -> int:
    """torchrun's main with node 0's rendezvous store bound to --master_addr only; exit 1 when a rank failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous
    from torch.distributed.run import main as torchrun_main

    static_tcp_rendezvous.TCPStore = _store_listening_only_on
    try:
        torchrun_main(argv)
    except ChildFailedError as e:  # the failing rank has printed its own error; one line for the launcher
        first = min(e.failures)
        print(f"error: training rank {first} failed (exit code {e.failures[first].exitcode}); torchrun stopped "
              f"the other ranks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_launcher(sys.argv[1:]))
