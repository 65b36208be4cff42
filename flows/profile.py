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
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("DVC_NO_ANALYTICS", "true")

from components.config import (Params, apply_overrides, parse_override, read_params_file,  # noqa: E402
                               validate_params)
from components.errors import ParamsError, UserError  # noqa: E402

PROFILE_DIR = "profiles"


def profile_path(root: Path, name_or_path: str) -> Path:
    """profiles/<name>.yaml for a bare name, else the given file. Raises ParamsError when it does not exist."""
    candidate = Path(name_or_path)
    if candidate.suffix not in (".yaml", ".yml"):
        candidate = root / PROFILE_DIR / f"{name_or_path}.yaml"
    elif not candidate.is_absolute():
        candidate = root / candidate
    if not candidate.is_file():
        known = sorted(p.stem for p in (root / PROFILE_DIR).glob("*.yaml"))
        raise ParamsError(f"profile '{name_or_path}' not found ({candidate}); known profiles: "
                          f"{', '.join(known) or '(none)'}")
    return candidate


def read_profile(path: Path) -> dict[str, Any]:
    """The profile's nested mapping of sections (the same reader and errors as params.yaml)."""
    return read_params_file(path)


def flatten_profile(profile: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"section.key": value}; lists and scalars are leaves (a list is set whole)."""
    flat: dict[str, Any] = {}
    for key, value in profile.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_profile(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def profile_overrides(profile: dict[str, Any], extra: Optional[list[str]] = None) -> list[str]:
    """`key.path=value` strings (JSON values: valid YAML, so DVC's -S parser and ours read them back the same),
    the profile's first, then `extra` (later ones win)."""
    flat = flatten_profile(profile)
    flat.update(dict(parse_override(o) for o in extra or []))
    return [f"{key}={json.dumps(value)}" for key, value in flat.items()]


def validate_profile(root: Path, overrides: list[str], source: str) -> Params:
    """params.yaml with the overrides applied, validated; ParamsError names the profile and the bad key."""
    raw = apply_overrides(read_params_file(root / "params.yaml"), overrides)
    return validate_params(raw, source=source)


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
        overrides = profile_overrides(read_profile(path), args.overrides)
        validate_profile(root, overrides, source=f"profile {path.name}")
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
