"""`python -m flows clean-checkpoints [--dry-run]` and `python -m flows.clean` (`make clean`): the retention rule
and output removal of components/tracking/cleanup.py, each saying what it removed."""
from __future__ import annotations

from pathlib import Path

from components.tracking.cleanup import clean_checkpoints, clean_outputs


def clean_command(root: Path, dry_run: bool) -> int:
    removed = clean_checkpoints(root, dry_run)
    verb = "would remove" if dry_run else "removed"
    for path, size in removed:
        print(f"{verb} {path.relative_to(root)} ({size / 1e6:.1f} MB)")
    total = sum(size for _, size in removed)
    print(f"{verb} {len(removed)} checkpoint director{'y' if len(removed) == 1 else 'ies'}, {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":  # make clean
    from flows.runtime import repo_root

    raise SystemExit(clean_outputs(repo_root()))
