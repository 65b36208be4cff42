"""`evaluate` stage: every available model on the NFE grid with the protocol v2 (DESIGN.md, "Evaluation protocol",
"Uncertainty"; the protocol itself is components/evaluation/protocol.py).

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
import functools
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from prefect import flow, get_run_logger

from components.config import EvaluateParams, Params, load_params
from components.data.shards import read_shard_manifest, read_split
from components.errors import DataError, UserError
from components.evaluation import (MissingDependencyError, extract_features, frechet_distance, image_grid,
                                   inception_fid, load_classifier, protocol, quality_vs_nfe, scatter_grid,
                                   trajectory_plot, validate_metrics_schema, write_html_report,
                                   write_quality_tables_per_model)
from components.evaluation.straightness import path_straightness
from components.io import read_json, write_json
from components.models.store import SPEC_FILE, WEIGHTS_FILE, LoadedModel, load_denoiser
from components.preferences.alignment import alignment_block
from components.tracking.lineage import MANIFEST
from components.tracking.registry import tag_evaluated_versions
from components.training.recipe import set_torch_threads
from flows.runtime import repo_root
from flows.stage import StageContext, StageSpec, declared_deps, read_manifest, run_stage_in_flow

BASE_INPUTS = ("data/shards", "models/featurizer")
SPEC = StageSpec(name="evaluate", output="data/evaluate/report", inputs=BASE_INPUTS + ("models/teacher",),
                 sections=("evaluate",))
PLOT_METRICS = {"points": ("sw2", "w2", "off_support"), "image": ("fd", "kid", "recall", "class_accuracy", "fid")}
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


def resolve_spec(repo: Path, params: Params) -> tuple[StageSpec, list[str]]:
    """The stage spec with one input per model to evaluate, and the listed models skipped (dir missing, not a dep).

    A model dir declared in dvc.yaml's evaluate deps stays an input even when missing, so the stage contract
    stops with "run `dvc repro <name>` first".
    """
    declared = set(declared_deps(repo, SPEC.name))
    model_inputs, skipped = [], []
    for name in params.evaluate.models:
        rel = f"models/{name}"
        (model_inputs if (repo / rel).exists() or rel in declared else skipped).append(name)
    inputs = BASE_INPUTS + tuple(f"models/{name}" for name in model_inputs)
    return dataclasses.replace(SPEC, inputs=inputs), skipped


def check_inputs_before_running(repo: Path, spec: StageSpec, p: EvaluateParams) -> None:
    """Cheap checks of the inputs, before the MLflow run opens: model dirs complete, enough held-out samples."""
    for rel in spec.inputs:
        directory = repo / rel
        if rel in BASE_INPUTS or not directory.exists():
            continue  # missing declared inputs are reported by the stage contract
        missing = [f for f in (WEIGHTS_FILE, SPEC_FILE, MANIFEST) if not (directory / f).is_file()]
        if missing:
            raise DataError(f"{directory} is not a complete model directory: missing {', '.join(missing)}")
    shard_manifest = repo / "data" / "shards" / MANIFEST
    if shard_manifest.exists() and p.n_samples is not None:
        manifest = read_json(shard_manifest)
        val_count = int(manifest["splits"]["val"]["count"])
        if manifest["kind"] == "image" and p.n_samples > val_count:
            raise DataError(f"evaluate.n_samples={p.n_samples}: the floor's real image sets come from the val split, "
                            f"which has {val_count}; lower it")
        toy = manifest["source"].get("source") == "toy2d"
        if manifest["kind"] == "points" and not toy and 2 * p.n_samples > val_count:
            raise DataError(f"evaluate.n_samples={p.n_samples} needs {2 * p.n_samples} held-out samples (reference "
                            f"+ floor sets), but the val split has {val_count}; lower it or use more data")


def model_names(ctx: StageContext) -> list[str]:
    return [rel.removeprefix("models/") for rel in ctx.spec.inputs if rel not in BASE_INPUTS]


def load_model(directory: Path, data_shape: list[int]) -> LoadedModel:
    """A model dir with weights, spec and lineage manifest whose data shape is that of the shards."""
    read_manifest(directory)  # DataError "<dir> has no manifest.json"
    model = load_denoiser(directory)
    if list(model.spec.get("data_shape", [])) != list(data_shape):
        raise DataError(f"{directory} was trained on data shape {model.spec.get('data_shape')}, "
                        f"but data/shards holds {list(data_shape)}")
    return model


# --------------------------------------------------------------------------- scoring


def inception_request(p: EvaluateParams, repo: Path, kind: str) -> Optional[Path]:
    """The Inception weights file to use, or None; a missing file is an error unless allowed."""
    if not p.inception_weights:
        return None
    log = _log()
    if kind != "image":
        log.warning("evaluate.inception_weights is ignored for 2-D data")
        return None
    path = Path(p.inception_weights)
    path = path if path.is_absolute() else repo / path
    if not path.is_file():
        message = f"evaluate.inception_weights: file not found: {p.inception_weights}"
        if not p.allow_missing_inception:
            raise DataError(message + " (set evaluate.allow_missing_inception: true to skip Inception-FID)")
        log.warning(message + "; Inception-FID skipped (allow_missing_inception)")
        return None
    return path


def with_inception_fid(score_fn, real: torch.Tensor, weights: Path, allow_missing: bool):
    """Extend an image score function with Inception-FID against the same held-out reference."""
    def score(samples: torch.Tensor, cond: Optional[torch.Tensor]) -> dict[str, Any]:
        scores = score_fn(samples, cond)
        try:
            scores["fid"] = inception_fid(real, samples, weights)
        except MissingDependencyError as e:
            if not allow_missing:
                raise DataError(f"evaluate.inception_weights: {e}") from None
            _log().warning(f"Inception-FID skipped: {e}")
        return scores
    return score


# --------------------------------------------------------------------------- the recipe


def build_reference(ctx: StageContext, kind: str, dataset: str, log) -> protocol.Reference:
    p = ctx.params.evaluate
    shards = ctx.path("data/shards")
    val_x, _ = read_split(shards, "val")
    if kind != "image":
        return protocol.points_reference(dataset, torch.from_numpy(val_x), p.n_samples, p.n_sweep, log)
    featurizer_dir = ctx.path("models/featurizer")
    try:
        classifier = load_classifier(featurizer_dir)
    except FileNotFoundError:
        raise DataError(f"{featurizer_dir} holds no reference classifier (rerun `dvc repro featurizer` "
                        "after switching to image data)") from None
    train_x, _ = read_split(shards, "train")
    reference = protocol.image_reference(dataset, classifier, torch.from_numpy(train_x), torch.from_numpy(val_x),
                                         p.n_samples, log)
    inception = inception_request(p, ctx.repo, kind)
    if inception is not None:
        reference.score = with_inception_fid(reference.score, torch.from_numpy(train_x), inception,
                                             p.allow_missing_inception)
    return reference


def model_plots(name: str, result: protocol.ModelResult, states, reference: protocol.Reference, report: Path,
                grid_size: int) -> dict[str, Path]:
    images: dict[str, Path] = {}
    if reference.kind == "image":
        for nfe, x in result.best_samples.items():
            images[f"{name} samples, NFE {nfe} (best sampler)"] = image_grid(x[:grid_size],
                                                                             report / f"samples_{name}_nfe{nfe}.png")
    else:
        images[f"{name} samples (default sampler)"] = scatter_grid({name: result.samples}, reference.points,
                                                                   report / f"scatter_{name}.png")
        images[f"{name} samples (best sampler)"] = scatter_grid({name: result.best_samples}, reference.points,
                                                                report / f"scatter_{name}_best.png")
        images[f"{name} ODE paths (flow frame)"] = trajectory_plot(states, report / f"trajectories_{name}.png",
                                                                   n_paths=16, real=reference.points)
    return images


def evaluate_models(ctx: StageContext, skipped: tuple[str, ...] = ()) -> dict:
    progress = protocol.Progress(_log().info)
    try:
        return evaluate_with_progress(ctx, progress, skipped)
    finally:
        progress.close()


def evaluate_with_progress(ctx: StageContext, progress: protocol.Progress, skipped: tuple[str, ...]) -> dict:
    p = ctx.params.evaluate
    data_manifest = read_shard_manifest(ctx.path("data/shards"))
    kind = data_manifest["kind"]
    dataset = data_manifest["source"].get("name") or data_manifest["source"]["source"]
    names = model_names(ctx)
    if not names:
        raise DataError(f"no model to evaluate: none of {', '.join(f'models/{m}' for m in p.models)} exists "
                        "(run the model stages first, e.g. `dvc repro teacher`)")
    models = {name: load_model(ctx.path(f"models/{name}"), data_manifest["shape"]) for name in names}
    set_torch_threads(models[names[0]].spec, sampling=True)
    progress(f"reference: held-out sets and {protocol.FLOOR_DRAWS} floor draws")
    try:
        reference = build_reference(ctx, kind, dataset, progress)
    except ValueError as e:
        raise DataError(str(e)) from None
    report = ctx.out_dir
    metric = protocol.PRIMARY[kind]
    results: dict[str, Any] = {}
    straightness: dict[str, Any] = {}
    images: dict[str, Path] = {}
    for name, model in models.items():
        progress(f"{name}: sampling at NFE {p.nfe} ({reference.n} points each; sweep on {p.n_sweep})")
        result = protocol.evaluate_model(name, model, reference, p.nfe, p.seed, p.n_sweep, p.samplers, p.grids,
                                         progress)
        noise, cond = protocol.fixed_noise_and_labels(model, min(reference.n, p.straightness_samples), p.seed)
        estimate, states = path_straightness(model, noise, cond, p.straightness_steps)
        straightness[name] = estimate.value
        straightness[f"{name}_ci"] = [estimate.lo, estimate.hi]
        results[name] = result.entry
        images.update(model_plots(name, result, states, reference, report, p.image_grid_size))
        progress(f"{name}: done (straightness {estimate.value:.4f})")
    teacher_best = protocol.mark_verdicts(results, metric)
    best_tables = {m: {"nfe": r["best"]} for m, r in results.items()}
    for plotted in PLOT_METRICS[kind]:
        if any(plotted in entry for r in results.values() for entry in r["best"].values()):
            floor = reference.floors.get(plotted)
            images[f"{plotted} vs NFE (best sampler)"] = quality_vs_nfe(
                best_tables, plotted, report / f"{plotted}_vs_nfe.png", floor=floor.mean if floor else None)
    write_quality_tables_per_model(best_tables, report / "plots")

    metrics: dict[str, Any] = {
        "dataset": dataset,
        "kind": kind,
        "protocol": 2,
        "n_samples": reference.n,
        "reference": reference.description,
        "floor": {k: f.mean for k, f in reference.floors.items()},
        "floor_sd": {k: f.sd for k, f in reference.floors.items()},
        "floor_draws": protocol.FLOOR_DRAWS,
        "teacher_best": teacher_best,
        "models": results,
        "straightness": straightness,
    }
    if "reflow" in straightness:  # the reflow issue's block: teacher vs rectified student
        metrics["reflow"] = {"straightness": {m: straightness[m] for m in ("teacher", "reflow") if m in straightness}}
    if "dpo" in models:
        progress("dpo: alignment block (win rate, rewards, implicit accuracy)")
        metrics["dpo"] = dpo_block(ctx, models, reference, kind, data_manifest["shape"])
    validate_metrics_schema(metrics)

    head = {"metric": f"{metric}_ratio", "models": protocol.headline(results, metric)}
    write_json(ctx.path(HEADLINE_FILE), head)
    write_results_csv(protocol.results_rows(results), report / "results.csv")
    lineage = lineage_rows(ctx)
    write_html_report(report / "report.html", metrics, images, lineage)
    ctx.manifest.update({
        "evaluated_models": names,
        "skipped_models": list(skipped),
        "n_samples": reference.n,
        "straightness_grid": f"euler, {p.straightness_steps} steps uniform in flow time s = sigma/(alpha+sigma), "
                             "states in the flow frame x/(alpha+sigma)",
        "model_lineage": lineage,
    })
    log_to_mlflow(ctx, results, head)
    tag_evaluated_versions(ctx.params.tracking.experiment, head["metric"], head["models"],
                           {name: ctx.path(f"models/{name}") for name in names})
    publish_table(results, reference, kind)
    ctx.run.log_artifacts(report, artifact_path="report")
    progress("evaluate: done")
    return metrics


def dpo_block(ctx: StageContext, models: dict, reference: protocol.Reference, kind: str, shape) -> dict:
    """The dpo issue's block: win rate over the reference on held-out seeds, rewards, drift."""
    p = ctx.params.evaluate
    shards = ctx.path("data/shards")
    val_x, val_y = read_split(shards, "val")
    feature_fn = None
    if kind == "image":
        classifier = load_classifier(ctx.path("models/featurizer"))
        real_features = extract_features(classifier, torch.from_numpy(val_x))
        feature_fn = lambda x: frechet_distance(real_features, extract_features(classifier, x))  # noqa: E731
    val_labels = torch.from_numpy(val_y) if val_y is not None and kind == "points" else None
    n = min(reference.n, len(val_x) // 2)

    def load_reference(rel: str) -> LoadedModel:
        return models.get(rel.removeprefix("models/")) or load_model(ctx.path(rel), shape)

    return alignment_block(models["dpo"], load_reference, n=n, seed=p.seed, real_x=torch.from_numpy(val_x),
                           real_y=val_labels, classifier_dir=ctx.path("models/featurizer"), feature_fn=feature_fn)


def write_results_csv(rows: list[dict], path: Path) -> Path:
    import csv

    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def log_to_mlflow(ctx: StageContext, results: dict, head: dict) -> None:
    """Quality vs NFE as MLflow series (step = NFE): `<model>.<metric>` for the default sampler and
    `<model>.best.<metric>` for the best one (intervals as _lo / _hi); the headline under plain names
    (`<model>_best`, `<model>_nfe1`, ...); the tidy table as an artifact (tables/results.csv)."""
    for name, entry in results.items():
        for which, prefix in (("nfe", name), ("best", f"{name}.best")):
            for nfe, cell in entry[which].items():
                values = {f"{prefix}.{k}": v for k, v in cell.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)}
                values.update({f"{prefix}.{k.removesuffix('_ci')}_{end}": v[i] for k, v in cell.items()
                               if isinstance(v, list) for i, end in enumerate(("lo", "hi"))})
                ctx.log_metrics(values, step=int(nfe))
    plain = {}
    for name, row in head["models"].items():
        for k, v in row.items():
            if isinstance(v, list):
                plain[f"{name}_{k.removesuffix('_ci')}_lo"], plain[f"{name}_{k.removesuffix('_ci')}_hi"] = v
            else:
                plain[f"{name}_{k}"] = v
    ctx.log_metrics(plain)
    ctx.run.log_artifact(ctx.out_dir / "results.csv", artifact_path="tables")


# --------------------------------------------------------------------------- report helpers


def lineage_rows(ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Which MLflow run (and commit) produced each input: data, featurizer and every model."""
    rows = {}
    for record in ctx.inputs:
        rows[record["path"]] = {
            "stage": record.get("stage") or "",
            "mlflow_run_id": record.get("run_id") or "",
            "git_commit": record.get("git_commit") or "",
            "digest": record.get("digest") or "",
            "digest_source": record.get("digest_source") or "",
        }
    return rows


def publish_table(results: dict, reference: protocol.Reference, kind: str) -> None:
    """The models x NFE table (best sampler, intervals) as a Prefect table artifact (shown on the flow run page)."""
    from prefect.artifacts import create_table_artifact

    rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            for row in protocol.results_rows(results) if row["which"] == "best"]
    floor_text = ", ".join(f"{k} = {f.mean:.4g} +- {f.sd:.2g}" for k, f in reference.floors.items())
    create_table_artifact(table=rows, key=TABLE_ARTIFACT_KEY,
                          description=f"Quality vs NFE, best sampler ({kind} data); floor (real vs real, mean +- sd "
                                      f"over {protocol.FLOOR_DRAWS} draws): {floor_text}")


@flow(name="evaluate", description="Evaluate every model on the NFE grid: metrics.json, plots, HTML report.")
def flow_fn():
    from prefect.states import Failed

    log = get_run_logger()
    try:
        params = load_params(repo_root() / "params.yaml")
        spec, skipped = resolve_spec(repo_root(), params)
        check_inputs_before_running(repo_root(), spec, params.evaluate)
    except UserError as e:
        log.error(f"{type(e).__name__}: {e}")
        return Failed(message=f"{e}", data=e)
    for name in skipped:
        log.warning(f"evaluate: models/{name} does not exist and is not a dep of evaluate in dvc.yaml; "
                    f"skipping model '{name}'")
    return run_stage_in_flow(spec, functools.partial(evaluate_models, skipped=tuple(skipped)))
