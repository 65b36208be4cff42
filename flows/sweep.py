"""`python -m flows queue ARGS...`: `dvc exp run --queue ARGS...` after checking the workspace can be queued.

DVC builds a queued experiment from the committed and staged workspace and silently leaves untracked files out;
the experiment then fails later, in its own copy, with a "No such file or directory" about a path under
.dvc/tmp/exps/. This says so in one line before anything is queued.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from components.errors import UserError


class DirtyWorkspace(UserError):
    """Files a queued experiment would not see."""


def untracked_files(root: Path) -> list[str]:
    """Files git does not track and does not ignore (the ones a queued experiment leaves out)."""
    out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=root, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise DirtyWorkspace(f"not a git repository: {root} (DVC experiments need git)")
    return out.stdout.split()


def check_queueable(root: Path) -> None:
    missing = untracked_files(root)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DirtyWorkspace(f"untracked files would be left out of the queued experiment: {shown}; "
                             "`git add` (or commit) them, or add them to .gitignore, then queue again")


def queue_command(dvc_args: list[str]) -> int:
    from flows.pipeline import subprocess_env
    from flows.runtime import repo_root

    root = repo_root()
    check_queueable(root)
    return subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--queue", *dvc_args], cwd=root,
                          env=subprocess_env()).returncode
