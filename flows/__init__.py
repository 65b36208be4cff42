"""Prefect flows, one module per stage (plus the whole pipeline). Entry point: `python -m flows --help`.

Flows call `components` (never the reverse) and are what `dvc.yaml` runs: `cmd: python -m flows <stage>`.
"""

# Stage name -> module defining `flow` (imported lazily: Prefect, MLflow and torch imports cost seconds).
STAGES: dict[str, str] = {
    "shard": "flows.shard",
    "teacher": "flows.teacher",
    "couplings": "flows.couplings",
    "reflow": "flows.reflow",
    "progressive": "flows.progressive",
    "consistency": "flows.consistency",
    "preferences": "flows.preferences",
    "dpo": "flows.dpo",
    "featurizer": "flows.featurizer",
    "evaluate": "flows.evaluate",
}
# Runnable with `python -m flows <name>` but not part of the DAG.
TOOLS: dict[str, str] = {
    "selfcheck": "flows.selfcheck",
}
