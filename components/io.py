"""Small I/O building blocks shared by every stage: atomic output directories, JSON, content digests, file
records a reader can verify, a lock that names its holder, a free port, and a stage process that stops when
whatever started it dies."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


@contextlib.contextmanager
def atomic_output_dir(final: Path | str) -> Iterator[Path]:
    """Yield a fresh temp directory next to `final`; move it into place only if the block succeeds.

    A stage killed or failing inside the block leaves the previous `final` (or nothing), never a half-written
    one: the temp dir lives on the same filesystem, so the final step is a rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp_dirs(final: Path | str) -> None:
    """Delete leftovers of killed runs (`.name.tmp-*`, `.name.old-*`) next to `final`."""
    final = Path(final)
    if not final.parent.exists():
        return
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def write_json(path: Path | str, obj: Any) -> None:
    """Write JSON (sorted keys, indented) via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(path)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_md5(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: Path | str, exclude: tuple[str, ...] = ("manifest.json",)) -> str:
    """md5 over (relative path, file md5) of every file under `root`, in sorted order.

    Independent of timestamps and of where the tree lives, so equal content gives an equal digest.
    """
    root = Path(root)
    h = hashlib.md5()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode() + b"\0" + file_md5(p).encode() + b"\n")
    return h.hexdigest()


def file_records(root: Path | str, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "md5"}} of every file under `root`: what a manifest records so that readers can
    check the files on disk are the ones it describes (`verify_file_records`)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "md5": file_md5(p)}
            for p in sorted(q for q in root.rglob("*") if q.is_file())
            if p.relative_to(root).as_posix() not in exclude}


def verify_file_records(root: Path | str, records: dict[str, dict[str, Any]]) -> Optional[str]:
    """None if every recorded file exists with its size and md5; else a short description of the first bad file.

    Sizes are compared first (a truncated file is found without reading anything), then contents.
    """
    root = Path(root)
    for rel, rec in records.items():
        path = root / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != rec["size"]:
            return f"{path} has {size} bytes, its manifest says {rec['size']} (truncated or replaced)"
    for rel, rec in records.items():
        if file_md5(root / rel) != rec["md5"]:
            return f"{root / rel} differs from the md5 in its manifest (modified or corrupt)"
    return None


class LockHeld(RuntimeError):
    """Another live process holds the lock; `holder` is the record it wrote (pid, host, start time, ...)."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {describe_holder(holder)}")


def describe_holder(holder: dict[str, Any]) -> str:
    started = holder.get("started_unix")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started {since})"


class HolderLock:
    """An exclusive `flock` on a file that also records who holds it; non-blocking unless `on_wait` is given.

    The kernel drops the lock when its holder dies (even by SIGKILL or the OOM killer), so a lock is never
    stale. The holder's record (pid, host, start time and whatever `update` adds) stays in the file after the
    holder is gone: `previous` is what the last holder left, i.e. the run to clean up after if it died.
    """

    def __init__(self, path: Path | str, on_wait: Optional[Callable[[dict[str, Any]], None]] = None, **info: Any):
        """`on_wait`: instead of raising LockHeld, call it with the holder's record and wait for the lock."""
        self.path = Path(path)
        self.on_wait = on_wait
        self.record: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                                       "started_unix": round(time.time(), 3), **info}
        self.previous: dict[str, Any] = {}
        self._file = None

    def __enter__(self) -> "HolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _parse_record(f.read())
            if self.on_wait is None:
                f.close()
                raise LockHeld(self.path, holder) from None
            self.on_wait(holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        self.previous = _parse_record(f.read())
        self._file = f
        self._write()
        return self

    def update(self, **info: Any) -> None:
        self.record.update(info)
        self._write()

    def restore_previous(self) -> None:
        """Put back the previous holder's record (for a short maintenance hold that must not hide a crash)."""
        self.record = dict(self.previous)
        self._write()

    def _write(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(self.record, default=str) + "\n")
        self._file.flush()

    def __exit__(self, *exc) -> None:
        self._file.close()  # releases the flock; the record stays for the next holder to read


def _parse_record(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def world_info() -> tuple[int, int]:
    """(rank, world size) of this process: the launcher's RANK / WORLD_SIZE when set (they describe the job this
    process is a rank of), else the live torch.distributed group's, else (0, 1). The one rank lookup (data loader,
    Trainer, sampling splits); it never imports torch itself, so a process without torch has no group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local server or a rank rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def exit_with_launcher(poll_seconds: float = 1.0) -> None:
    """Stop this stage (SIGTERM: Prefect marks it Crashed, MLflow FAILED) when the process that started it dies.

    Killing `dvc repro` (or the pipeline) must not leave an orphaned stage training on, overlapping the next
    run. dvc runs a stage's cmd through $SHELL, or /bin/sh when SHELL is unset (dash, which does not exec the
    command), so the launcher may be a shell's parent: every process from here up through shells is watched,
    and a change of any one's parent pid (re-parenting) means its launcher died.
    """
    chain = _launcher_chain()
    if not chain:  # started detached on purpose (nohup, setsid): nothing to follow
        return

    def watch() -> None:
        while all(_parent_of(pid) == parent for pid, parent in chain):
            time.sleep(poll_seconds)
        print(f"error: the process that started this stage (pid {chain[-1][1]}) exited; stopping stage",
              file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


SHELLS = {"sh", "dash", "bash", "zsh", "fish", "ksh"}


def _parent_of(pid: int) -> int | None:
    try:  # the field after the parenthesised command name (which may hold spaces) is the state, then ppid
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return os.getppid() if pid == os.getpid() else None


def _launcher_chain() -> list[tuple[int, int]]:
    """(pid, its parent) from this process up to the first ancestor that is not a shell."""
    chain, pid = [], os.getpid()
    while True:
        parent = _parent_of(pid)
        if not parent or parent == 1:
            return chain
        chain.append((pid, parent))
        try:
            name = Path(f"/proc/{parent}/comm").read_text().strip()
        except OSError:
            return chain
        if name not in SHELLS:
            return chain
        pid = parent
