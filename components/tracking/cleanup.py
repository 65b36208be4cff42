"""Removing what the pipeline wrote: checkpoint directories no current output needs, or every output.

Checkpoint retention, per stage (checkpoints/<stage>/<fingerprint>/): keep the directory the stage's current output
was trained in (`checkpoint_dir` in its manifest.json or run record: a longer run resumes from it) and the most
recently written one (a crashed or interrupted run resumes from it); remove the others (older params, data or
code). A stage that is running (its lock is held) is left alone.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from components.io import HolderLock, LockHeld, describe_holder, read_json
from components.tracking.lineage import MANIFEST, dvc_stages, entry_paths, run_record_path
from components.tracking.stage import LOCK_DIR


def current_checkpoint_dirs(root: Path) -> set[str]:
    """checkpoints/... directories the current outputs were trained in: named by the manifests of the outputs
    declared in dvc.yaml or by the stages' run records (data/<stage>/run.json)."""
    keep = set()
    for name, stage in dvc_stages(root).items():
        for path in [root / rel / MANIFEST for rel in entry_paths(stage.get("outs"))] + [run_record_path(root, name)]:
            with contextlib.suppress(OSError, ValueError):
                named = read_json(path).get("checkpoint_dir")
                if isinstance(named, str):
                    keep.add(Path(named).as_posix())
    return keep


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def clean_checkpoints(root: Path, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Apply the retention rule; returns the (directory, bytes) removed (or that would be, with dry_run)."""
    base = root / "checkpoints"
    if not base.is_dir():
        return []
    needed = current_checkpoint_dirs(root)
    removed = []
    for stage_dir in sorted(p for p in base.iterdir() if p.is_dir() and p.name != Path(LOCK_DIR).name):
        runs = [p for p in stage_dir.iterdir() if p.is_dir()]
        if not runs:
            continue
        newest = max(runs, key=lambda p: max((q.stat().st_mtime for q in p.rglob("*")), default=p.stat().st_mtime))
        stale = [p for p in runs if p != newest and p.relative_to(root).as_posix() not in needed]
        if not stale:
            continue
        try:
            with HolderLock(root / LOCK_DIR / f"{stage_dir.name}.lock", purpose="clean-checkpoints") as lock:
                try:
                    for path in sorted(stale):
                        size = dir_size(path)
                        if not dry_run:
                            shutil.rmtree(path)
                        removed.append((path, size))
                finally:
                    lock.restore_previous()  # the last stage run's record is what crash settling reads
        except LockHeld as e:
            print(f"skipping checkpoints/{stage_dir.name}: the stage is running ({describe_holder(e.holder)})")
    return removed


def pipeline_outputs(root: Path) -> list[Path]:
    """Everything the pipeline writes: every output, metrics and plots file of dvc.yaml, each stage's run record,
    its checkpoints (checkpoints/), and `dvc plots show`'s dvc_plots/. Not the MLflow store or Prefect state."""
    paths = [root / rel for stage in dvc_stages(root).values() for key in ("outs", "metrics", "plots")
             for rel in entry_paths(stage.get(key))]
    paths += [run_record_path(root, name) for name in dvc_stages(root)]
    paths += [root / "checkpoints", root / "dvc_plots"]
    return [p for p in paths if p.exists() or p.is_symlink()]


def clean_outputs(root: Path) -> int:
    """`make clean`: remove every pipeline output and print each one removed (with its size)."""
    removed = 0
    for path in pipeline_outputs(root):
        size = dir_size(path) if path.is_dir() else path.stat().st_size
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed += size
        print(f"removed {path.relative_to(root)} ({size / 1e6:.1f} MB)")
    print(f"removed {removed / 1e6:.1f} MB of pipeline outputs")
    print("kept: the MLflow store (mlflow.db, mlartifacts/), Prefect state (.prefect/), DVC's cache (.dvc/cache: "
          "`dvc checkout` restores the outputs dvc.lock records) and git-tracked metrics (`git checkout data/`)")
    return 0
