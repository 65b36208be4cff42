"""`python -m flows lineage <run id | stage>`: the chain of MLflow runs from one run back to the data.

A stage name means the run that produced that stage's *current* output (the run record data/<stage>/run.json when
it describes the output's current content, else the MLflow run tagged with that content digest, so a stage DVC
skipped or restored still points at the run that really made its data); if the output is missing, the newest
finished run tagged with that stage. Each run is printed with its stage, status, git commit, parent pipeline run
and inputs (dataset name + digest, the DVC hash from dvc.lock), then its upstream runs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from components.config import load_params
from components.tracking.lineage import dvc_stages, output_producers, output_run_id, resolve_tracking_uri
from components.tracking.registry import check_tracking_server
from components.tracking.runs import RunNotFound, latest_stage_run_id, lineage_chain
from flows.runtime import repo_root

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_ref(root: Path, ref: str, experiment: str, tracking_uri: str) -> str:
    """A run id for `ref`: itself if it looks like one, else the run behind the stage's current output."""
    if RUN_ID.match(ref):
        return ref
    stages = dvc_stages(root)
    if ref not in stages:
        raise RunNotFound(f"'{ref}' is neither an MLflow run id nor a stage of dvc.yaml "
                          f"({', '.join(stages) or 'no stages'})")
    for out in (path for path, stage in output_producers(root).items() if stage == ref):
        if (root / out).exists():
            run_id = output_run_id(root, ref, out, experiment, tracking_uri)
            if run_id:
                return run_id
    run_id = latest_stage_run_id(experiment, ref, tracking_uri)
    if not run_id:
        raise RunNotFound(f"stage '{ref}' has no output manifest and no finished MLflow run in '{experiment}'")
    return run_id


def format_chain(chain: list[dict[str, Any]]) -> str:
    lines = []
    for record in chain:
        if record.get("missing"):
            lines.append(f"- run {record['run_id']}: MISSING (referenced upstream, not in this tracking store)")
            continue
        lines.append(f"- {record['stage'] or '?'}  run {record['run_id']}  [{record['status']}]")
        lines.append(f"    git commit  {record['git_commit']}")
        lines.append(f"    parent run  {record['parent_run_id'] or '-'}")
        for ds in record["inputs"]:
            lines.append(f"    input       {ds['name']}  digest {ds['digest']}  (from {ds['context']})")
        for stage, run_id in record["upstream"].items():
            lines.append(f"    upstream    {stage} -> run {run_id}")
        if not record["upstream"] and not record["inputs"]:
            data = {k: v for k, v in record["params"].items() if k.startswith("data.")}
            lines.append(f"    source data {', '.join(f'{k}={v}' for k, v in sorted(data.items())) or '-'}")
    return "\n".join(lines)


def lineage_command(ref: str, as_json: bool = False, root: Optional[Path] = None) -> int:
    root = root or repo_root()
    params = load_params(root / "params.yaml")
    tracking_uri = resolve_tracking_uri(root, params.tracking.uri)
    check_tracking_server(tracking_uri)
    run_id = resolve_ref(root, ref, params.tracking.experiment, tracking_uri)
    chain = lineage_chain(run_id, tracking_uri)
    print(json.dumps(chain, indent=2) if as_json else format_chain(chain))
    return 0
