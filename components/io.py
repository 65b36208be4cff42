"""Small I/O building blocks shared by every stage: atomic output directories, JSON, content digests, a free port."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local server or a rank rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
