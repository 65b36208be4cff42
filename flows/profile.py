"""Profiles: named sets of param overrides (profiles/<name>.yaml, nested like params.yaml) run THROUGH DVC.

`python -m flows.profile digits` flattens profiles/digits.yaml into `key.path=value` overrides and runs the
pipeline flow with them (flows/pipeline.py): the overrides are validated against the params schema before
anything runs, written into params.yaml the way `dvc exp run -S` does, the stages are reproduced by DVC, and the
result is saved as a DVC experiment named `profile-<name>` (unless --name). So params.yaml, dvc.lock and MLflow
agree on what ran. Back to the default: `git checkout params.yaml && dvc repro`.

    python -m flows.profile digits                         # the whole DAG on the digits profile
    python -m flows.profile digits --check                 # validate the profile only, print its overrides
    python -m flows.profile cifar10 --set data.path=/data/cifar-10-python.tar.gz teacher
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

os.environ.setdefault("DVC_NO_ANALYTICS", "true")

from components.config import load_params  # noqa: E402
from components.errors import UserError  # noqa: E402
from components.profiles import profile_path, read_profile_overrides  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.profile",
        description="Run the pipeline with a profile of param overrides (profiles/<name>.yaml) through DVC; "
                    "the run is saved as a DVC experiment. Back to the default: git checkout params.yaml.")
    parser.add_argument("profile", help="a profile name (profiles/<name>.yaml) or a YAML file")
    parser.add_argument("targets", nargs="*", default=["all"], help="stage names (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override on top of the profile, e.g. data.path=... (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate the profile and print its overrides; run nothing")
    parser.add_argument("--force", action="store_true", help="rerun the planned stages even if up to date")
    parser.add_argument("--name", dest="run_name", default=None,
                        help="MLflow parent run / DVC experiment name (default: profile-<profile>)")
    args = parser.parse_intermixed_args(argv)  # targets may follow --set/--name

    from flows.runtime import repo_root

    try:
        root = repo_root()
        path = profile_path(root, args.profile)
        overrides = read_profile_overrides(path, args.overrides)
        load_params(root / "params.yaml", overrides, source=f"profile {path.name}")
        if args.check:
            print("\n".join(overrides))
            print(f"profile {path.stem} OK ({len(overrides)} overrides)", file=sys.stderr)
            return 0
        from flows.pipeline import run_pipeline_command

        return run_pipeline_command(args.targets, args.force, overrides, args.run_name or f"profile-{path.stem}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
