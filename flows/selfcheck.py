"""`selfcheck`: the stage contract with an empty body (not part of the DAG).

Checks that Prefect, MLflow and atomic output writing work on this machine, and measures the fixed cost every
stage pays (`benchmarks/bench_stage_overhead.py`).
"""
from __future__ import annotations

from prefect import flow

from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="selfcheck", output="data/selfcheck/out", sections=("tracking",))


def do_nothing(ctx: StageContext) -> dict:
    return {}


@flow(name="selfcheck", description="Run the stage contract with an empty body (health check, overhead).")
def flow_fn():
    return run_stage_in_flow(SPEC, do_nothing)
