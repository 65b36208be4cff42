"""`evaluate` stage: every available model on the NFE grid with the protocol v2 (DESIGN.md, "Evaluation protocol",
"Uncertainty"; the protocol is components/evaluation/protocol.py, the scoring and report components/evaluation/
leaderboard.py).

Inputs: data/shards, models/featurizer (image data) and models/<name>/ for each name in `evaluate.models`. A listed
model whose directory does not exist is skipped with a warning, unless `models/<name>` is declared as a dep of
`evaluate` in dvc.yaml: then it is expected and its absence is an error. So adding a student to the pipeline is two
lines: its name in `evaluate.models` and its dir in the evaluate deps.

Recipe: build the reference (held-out sets, floors) once; per model, score its default sampler and its best sampler x
grid at every NFE with intervals, and its straightness; mark ties against the teacher's best; write
data/evaluate/metrics.json (full table, returned), data/evaluate/headline.json (DVC metrics: best ratios at NFE 1, 2,
4 and the best NFE), the report dir (HTML, plots, results.csv), MLflow (per-NFE series with step = NFE, headline
metrics, the results table) and a Prefect table artifact.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from components.config import Params
from components.data.shards import read_shard_manifest
from components.errors import DataError
from components.evaluation import leaderboard, protocol, validate_metrics_schema
from components.evaluation.straightness import straightness_grid
from components.io import read_json, write_json
from components.tracking.lineage import MANIFEST
from components.tracking.registry import tag_evaluated_versions
from components.tracking.stage import StageContext, StageSpec, declared_deps
from components.training.recipe import set_torch_threads
from flows.stage import run_stage_in_flow

BASE_INPUTS = ("data/shards", "models/featurizer")
SPEC = StageSpec(name="evaluate", output="data/evaluate/report", inputs=BASE_INPUTS + ("models/teacher",),
                 sections=("evaluate",))
TABLE_ARTIFACT_KEY = "evaluate-quality"
HEADLINE_FILE = "data/evaluate/headline.json"


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow run (shown in the UI), the module logger elsewhere."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


# --------------------------------------------------------------------------- which models


def resolve_spec(repo: Path, params: Params) -> StageSpec:
    """The stage spec with one input per model to evaluate; a listed model whose dir is missing and not a dep is
    skipped with a warning (a model dir declared in dvc.yaml's evaluate deps stays an input even when missing, so
    the stage contract stops with "run `dvc repro <name>` first"). Then cheap checks before the MLflow run opens:
    model dirs complete, enough held-out samples."""
    declared = set(declared_deps(repo, SPEC.name))
    inputs = BASE_INPUTS + tuple(f"models/{name}" for name in params.evaluate.models
                                 if (repo / f"models/{name}").exists() or f"models/{name}" in declared)
    for rel in inputs:
        if rel not in BASE_INPUTS and (repo / rel).exists():  # missing declared inputs: the stage contract says so
            leaderboard.check_model_dir(repo / rel)
    shard_manifest = repo / "data" / "shards" / MANIFEST
    if shard_manifest.exists():
        leaderboard.check_sample_sizes(read_json(shard_manifest), params.evaluate)
    for name in skipped_models(params, inputs):
        _log().warning(f"evaluate: models/{name} does not exist and is not a dep of evaluate in dvc.yaml; "
                       f"skipping model '{name}'")
    return dataclasses.replace(SPEC, inputs=inputs)


def skipped_models(params: Params, inputs: tuple[str, ...]) -> list[str]:
    return [name for name in params.evaluate.models if f"models/{name}" not in inputs]


def model_names(ctx: StageContext) -> list[str]:
    return [rel.removeprefix("models/") for rel in ctx.spec.inputs if rel not in BASE_INPUTS]


# --------------------------------------------------------------------------- the recipe


def evaluate_models(ctx: StageContext) -> dict:
    log = _log()
    progress = protocol.Progress(log.info)
    try:
        return evaluate_with_progress(ctx, progress, log.warning)
    finally:
        progress.close()


def evaluate_with_progress(ctx: StageContext, progress, warn) -> dict:
    p = ctx.params.evaluate
    shards, featurizer = ctx.path("data/shards"), ctx.path("models/featurizer")
    data_manifest = read_shard_manifest(shards)
    names = model_names(ctx)
    if not names:
        raise DataError(f"no model to evaluate: none of {', '.join(f'models/{m}' for m in p.models)} exists "
                        "(run the model stages first, e.g. `dvc repro teacher`)")
    models = {name: leaderboard.load_model(ctx.path(f"models/{name}"), data_manifest["shape"]) for name in names}
    set_torch_threads(models[names[0]].spec, sampling=True)
    progress(f"reference: held-out sets and {protocol.FLOOR_DRAWS} floor draws")
    reference = leaderboard.build_reference(shards, featurizer, p, ctx.repo, progress, warn)
    d = ctx.params.distributed
    ranks = None if d.world_size == 1 else leaderboard.RankSplit(
        {name: ctx.path(f"models/{name}") for name in names}, shards, featurizer, ctx.repo,
        ctx.path("checkpoints/evaluate"), p, d)
    board = leaderboard.score_models(models, reference, p, ctx.out_dir, progress, ranks)
    if "dpo" in models:
        progress("dpo: alignment block (win rate, rewards, implicit accuracy)")
        board.metrics["dpo"] = leaderboard.dpo_block(models, reference, shards, featurizer, ctx.repo, p.seed)
    validate_metrics_schema(board.metrics)

    write_json(ctx.path(HEADLINE_FILE), board.headline)
    lineage = leaderboard.lineage_rows(ctx.inputs)
    leaderboard.write_report(board, ctx.out_dir, lineage)
    ctx.manifest.update({
        "evaluated_models": names,
        "skipped_models": skipped_models(ctx.params, ctx.spec.inputs),
        "n_samples": reference.n,
        "straightness_grid": straightness_grid(p.straightness_steps),
        "model_lineage": lineage,
    })
    for nfe, values in leaderboard.mlflow_series(board.results).items():
        ctx.log_metrics(values, step=nfe)
    ctx.log_metrics(leaderboard.headline_metrics(board.headline))
    ctx.run.log_artifact(ctx.out_dir / leaderboard.RESULTS_CSV, artifact_path="tables")
    tag_evaluated_versions(ctx.params.tracking.experiment, board.headline["metric"], board.headline["models"],
                           {name: ctx.path(f"models/{name}") for name in names})
    rows, description = leaderboard.best_table(board.results, reference)
    create_table_artifact(table=rows, key=TABLE_ARTIFACT_KEY, description=description)
    ctx.run.log_artifacts(ctx.out_dir, artifact_path="report")
    progress("evaluate: done")
    return board.metrics


@flow(name="evaluate", description="Evaluate every model on the NFE grid: metrics.json, plots, HTML report.")
def flow_fn():
    return run_stage_in_flow(resolve_spec, evaluate_models)
