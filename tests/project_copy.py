"""A throwaway copy of this project as a fresh git repo: what tests and benchmarks run `dvc`/`python -m flows` in."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_project(dest: Path) -> Path:
    """Copy the project's source files (tracked + new, not ignored) into `dest` and commit them there.

    The developer's dvc.lock and metrics files are left out: a copy starts as a pipeline that never ran."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        pipeline_output = rel == "dvc.lock" or (rel.startswith("data/") and rel != "data/.gitkeep")
        if not pipeline_output and src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "project copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest
