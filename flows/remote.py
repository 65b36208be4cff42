"""`python -m flows remote`: is the DVC remote that `dvc push` / `dvc pull` use there? One line either way.

DVC's own messages for a missing or unreachable remote are a list of every missing file ("Is your cache up to
date?") or a traceback-length error; this names the remote, its URL and what to do, in one line, before a
`dvc pull` / `dvc repro --pull` on a new machine or a `dvc push` after a run.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from components.errors import UserError


class RemoteUnavailable(UserError):
    """No DVC remote configured, or the configured one is missing or unreachable."""


def check_remote(root: Path, name: Optional[str] = None) -> str:
    """The remote's description (`name -> url`); raises RemoteUnavailable (one line) when it cannot be used."""
    from dvc.config import RemoteNotFoundError
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    fix = "dvc remote modify --local {name} url <url>"
    with Repo(str(root)) as repo:
        name = name or repo.config["core"].get("remote")
        if not name:
            raise RemoteUnavailable("no DVC remote configured; add one: dvc remote add -d storage <url> "
                                    "(a directory, s3://..., gs://..., ssh://...)")
        url = repo.config["remote"].get(name, {}).get("url", "?")
        try:
            remote = repo.cloud.get_remote(name)
        except RemoteNotFoundError:
            raise RemoteUnavailable(f"DVC remote '{name}' is not defined in .dvc/config "
                                    f"(known: {', '.join(repo.config['remote']) or 'none'})") from None
        except (DvcException, ImportError) as e:  # e.g. "s3 is supported, but requires 'dvc-s3' to be installed"
            scheme = str(url).split("://")[0]
            raise RemoteUnavailable(f"DVC remote '{name}' ({url}): {' '.join(str(e).split())}; install it: "
                                    f"pip install 'dvc[{scheme}]'") from None
        where = f"DVC remote '{name}' ({url})"  # DVC resolves a relative local url against .dvc/
        try:
            exists = remote.fs.exists(remote.path)
        except Exception as e:  # noqa: BLE001 - network, credentials, DNS: whatever the filesystem raises
            raise RemoteUnavailable(f"{where} is unreachable: {' '.join(str(e).split())[:300]}; check the "
                                    f"network and credentials, or point it elsewhere: {fix.format(name=name)}") from None
        if not exists:
            hint = f"mkdir -p {remote.path}" if remote.fs.protocol == "local" else "create it"
            raise RemoteUnavailable(f"{where} does not exist; {hint}, or point it elsewhere: "
                                    f"{fix.format(name=name)}")
    return where


def remote_command(name: Optional[str] = None) -> int:
    from flows.runtime import repo_root

    print(f"{check_remote(repo_root(), name)} is reachable")
    return 0


if __name__ == "__main__":
    sys.exit(remote_command())
