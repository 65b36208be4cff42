"""Profiles: named sets of param overrides (profiles/<name>.yaml, nested like params.yaml), flattened into the
`key.path=value` overrides that the pipeline writes into params.yaml the way `dvc exp run -S` does."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from components.config import parse_override, read_params_file
from components.errors import ParamsError

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


def read_profile_overrides(path: Path, extra: Optional[list[str]] = None) -> list[str]:
    """The overrides of the profile file at `path` (read like params.yaml, with its errors), then `extra`."""
    return profile_overrides(read_params_file(path), extra)
