"""`evaluate` stage: every available model on the NFE grid of the fixed protocol (DESIGN.md, "Evaluation protocol").

Inputs: data/shards (the held-out `val` split is the reference), models/featurizer (image data) and
models/<name>/ for each name in `evaluate.models`. A listed model whose directory does not exist is skipped with
a warning, unless `models/<name>` is declared as a dep of `evaluate` in dvc.yaml: then it is expected and its
absence is an error (DVC would not run the stage without it either). So adding a student to the pipeline is two
lines: its name in `evaluate.models` and its dir in the evaluate deps.

Per model: n samples from fixed noise (seed `evaluate.seed`, the same noise at every NFE and on every rerun),
scored against n held-out samples; the floor is the same metric between two disjoint held-out sets of n.
  2-D:    sw2, mmd (+ ratios to the floor);   images: fd, precision, recall in the reference classifier's
  feature space, class_accuracy of conditional samples (the model's default guidance), fid with Inception.
Straightness: every model integrates its PF-ODE with Euler on the SAME grid, `straightness_steps` steps uniform in
flow time s = sigma / (alpha + sigma), and the states are mapped to the flow frame y = x / (alpha + sigma)
(where any (alpha, sigma) path reads y_s = (1 - s) x0 + s eps), so models with different schedules are comparable.

Outputs: data/evaluate/metrics.json (returned dict; DVC metrics; validated against the DESIGN.md schema) and the
report dir data/evaluate/report/ (report.html, quality-vs-NFE PNGs, per-model scatter plots or image grids,
trajectory plots for 2-D data, plots/<model>.json tables for `dvc plots`). The same numbers go to MLflow (the
report dir as artifacts) and to a Prefect table artifact.
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
from components.diffusion.guidance import GuidedDenoiser
from components.diffusion.samplers import sample
from components.errors import DataError, UserError
from components.evaluation import (MissingDependencyError, disjoint_subsets, floor_2d, floor_images, image_grid,
                                   inception_fid, load_classifier, make_2d_score_fn, make_image_score_fn, nfe_sweep,
                                   quality_table_rows, quality_vs_nfe, scatter_grid, straightness, trajectory_plot,
                                   validate_metrics_schema, write_html_report, write_quality_tables_per_model)
from components.io import read_json
from components.evaluation import extract_features, frechet_distance
from components.preferences.alignment import alignment_block
from components.models.store import SPEC_FILE, WEIGHTS_FILE, LoadedModel, load_denoiser
from components.tracking.lineage import MANIFEST
from components.training.denoiser_training import set_torch_threads
from flows.runtime import repo_root
from flows.stage import StageContext, StageSpec, declared_deps, read_manifest, run_stage_in_flow

BASE_INPUTS = ("data/shards", "models/featurizer")
SPEC = StageSpec(name="evaluate", output="data/evaluate/report", inputs=BASE_INPUTS + ("models/teacher",),
                 sections=("evaluate",))
MAX_SAMPLES = 2000  # n_samples: null -> min(MAX_SAMPLES, val count // 2)
PLOT_METRICS = {"points": ("sw2", "mmd"), "image": ("fd", "precision", "recall", "class_accuracy", "fid")}
TABLE_ARTIFACT_KEY = "evaluate-quality"




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
    if shard_manifest.exists():
        resolve_n_samples(p.n_samples, int(read_json(shard_manifest)["splits"]["val"]["count"]))


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


def resolve_n_samples(requested: Optional[int], val_count: int) -> int:
    """Samples per NFE point: two disjoint held-out sets of n are needed (reference + floor)."""
    n = min(MAX_SAMPLES, val_count // 2) if requested is None else requested
    if 2 * n > val_count:
        raise DataError(f"evaluate.n_samples={n} needs {2 * n} held-out samples (reference + floor sets), "
                        f"but the val split has {val_count}; lower it or use more data")
    if n < 10:
        raise DataError(f"the val split has {val_count} samples; evaluation needs at least 20 (2 sets of 10)")
    return n


# --------------------------------------------------------------------------- sampling


def fixed_noise_and_labels(model: LoadedModel, n: int, seed: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The evaluation noise [n, *data_shape] and, for a conditional model, balanced labels i % num_classes."""
    noise = torch.randn((n, *model.spec["data_shape"]), generator=torch.Generator().manual_seed(seed))
    cond = torch.arange(n) % model.num_classes if model.num_classes else None
    return noise, cond


def ode_denoiser(model: LoadedModel, cond: Optional[torch.Tensor]):
    """The denoiser the model samples with by default (guided when conditional with guidance != 1)."""
    w = float(model.spec["sampler"].get("guidance", 1.0))
    if cond is not None and w != 1.0:
        return GuidedDenoiser(model.denoiser, w, null_label=model.num_classes)
    return model.denoiser


def flow_time_grid(model: LoadedModel, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Times t (descending, t_max -> t_end) whose flow times s = sigma / (alpha + sigma) are uniform; returns (t, s)."""
    schedule = model.schedule
    ends = torch.tensor([schedule.t_max, schedule.t_end], dtype=torch.float64)
    s_ends = schedule.sigma(ends) / (schedule.alpha(ends) + schedule.sigma(ends))
    s = torch.linspace(float(s_ends[0]), float(s_ends[1]), steps + 1, dtype=torch.float64)
    inner = s[1:-1]
    times = torch.cat([ends[:1], schedule.t_of_log_snr(torch.log((1 - inner) / inner)).to(torch.float64), ends[1:]])
    return times, s


def flow_frame_trajectory(model: LoadedModel, noise: torch.Tensor, cond: Optional[torch.Tensor],
                          steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Euler PF-ODE states on the flow-time-uniform grid, mapped to the flow frame; returns (states, s)."""
    times, s = flow_time_grid(model, steps)
    with torch.no_grad():
        result = sample(ode_denoiser(model, cond), model.schedule, times, noise, method="euler", cond=cond,
                        return_trajectory=True)
    scale = model.schedule.alpha(times) + model.schedule.sigma(times)
    states = [x / float(c) for x, c in zip(result.trajectory, scale)]
    return states, s


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
    def score(samples: torch.Tensor) -> dict[str, float]:
        scores = score_fn(samples)
        try:
            scores["fid"] = inception_fid(real, samples, weights)
        except MissingDependencyError as e:
            if not allow_missing:
                raise DataError(f"evaluate.inception_weights: {e}") from None
            _log().warning(f"Inception-FID skipped: {e}")
        return scores
    return score


def evaluate_model(name: str, model: LoadedModel, p: EvaluateParams, n: int, make_score_fn,
                   reference: torch.Tensor, inception: Optional[Path], report: Path):
    """One model: NFE sweep on fixed noise, flow-frame straightness, and its sample plots.

    `make_score_fn(cond)` builds the protocol's score function for samples generated for labels `cond`.
    Returns ({"nfe": {...}}, straightness, {caption: png path}).
    """
    noise, cond = fixed_noise_and_labels(model, n, p.seed)
    samples_by_nfe: dict[int, torch.Tensor] = {}

    def generate(nfe: int, noise: torch.Tensor, cond: Optional[torch.Tensor]):
        # A fresh generator per point: stochastic samplers draw the same noise on every rerun.
        result = model.sample(noise, nfe=nfe, cond=cond, generator=torch.Generator().manual_seed(p.seed + 1))
        samples_by_nfe[nfe] = result.x
        return result.x, result.nfe

    score_fn = make_score_fn(cond)
    if inception is not None:
        score_fn = with_inception_fid(score_fn, reference, inception, p.allow_missing_inception)
    entry = {"nfe": nfe_sweep(generate, p.nfe, noise, cond, score_fn)}

    states, flow_times = flow_frame_trajectory(model, noise, cond, p.straightness_steps)
    images: dict[str, Path] = {}
    if noise.ndim == 4:  # images [N, C, H, W]
        for nfe, x in samples_by_nfe.items():
            images[f"{name} samples, NFE {nfe}"] = image_grid(x[:p.image_grid_size],
                                                               report / f"samples_{name}_nfe{nfe}.png")
    else:
        images[f"{name} samples"] = scatter_grid({name: samples_by_nfe}, reference, report / f"scatter_{name}.png")
        images[f"{name} ODE paths (flow frame)"] = trajectory_plot(states, report / f"trajectories_{name}.png",
                                                                   n_paths=16, real=reference)
    return entry, straightness(states, flow_times), images


def evaluate_models(ctx: StageContext, skipped: tuple[str, ...] = ()) -> dict:
    p = ctx.params.evaluate
    shards = ctx.path("data/shards")
    data_manifest = read_shard_manifest(shards)
    kind = data_manifest["kind"]
    names = model_names(ctx)
    if not names:
        raise DataError(f"no model to evaluate: none of {', '.join(f'models/{m}' for m in p.models)} exists "
                        "(run the model stages first, e.g. `dvc repro teacher`)")
    models = {name: load_model(ctx.path(f"models/{name}"), data_manifest["shape"]) for name in names}
    # One thread for MLPs: on 2 busy cores, 2 threads made 2-D sampling 5x slower (thread sync dominates).
    set_torch_threads(models[names[0]].spec)
    val_x, val_y = read_split(shards, "val")
    n = resolve_n_samples(p.n_samples, len(val_x))
    reference, floor_set = disjoint_subsets(torch.from_numpy(val_x), n)
    report = ctx.out_dir
    images: dict[str, Path] = {}

    classifier = None
    if kind == "image":
        featurizer_dir = ctx.path("models/featurizer")
        try:
            classifier = load_classifier(featurizer_dir)
        except FileNotFoundError:
            raise DataError(f"{featurizer_dir} holds no reference classifier (rerun `dvc repro featurizer` "
                            "after switching to image data)") from None
        floor = floor_images(classifier, reference, floor_set)
        inception = inception_request(p, ctx.repo, kind)
    else:
        floor = floor_2d(reference, floor_set)
        inception = None

    results: dict[str, Any] = {}
    straightness_by_model: dict[str, float] = {}
    if classifier is not None:
        make_score_fn = functools.partial(make_image_score_fn, classifier, reference, floor)
    else:
        make_score_fn = lambda cond: make_2d_score_fn(reference, floor)  # noqa: E731  (no labels in 2-D scores)
    for name, model in models.items():
        results[name], straightness_by_model[name], model_images = evaluate_model(
            name, model, p, n, make_score_fn, reference, inception, report)
        images.update(model_images)

    for metric in PLOT_METRICS[kind]:
        if any(metric in entry for r in results.values() for entry in r["nfe"].values()):
            images[f"{metric} vs NFE"] = quality_vs_nfe(results, metric, report / f"{metric}_vs_nfe.png",
                                                        floor=floor.get(metric))
    write_quality_tables_per_model(results, report / "plots")

    metrics: dict[str, Any] = {
        "dataset": data_manifest["source"].get("name") or data_manifest["source"]["source"],
        "kind": kind,
        "n_samples": n,
        "floor": floor,
        "models": results,
        "straightness": straightness_by_model,
    }
    if "reflow" in straightness_by_model:  # the reflow issue's block: teacher vs rectified student
        metrics["reflow"] = {"straightness": {m: straightness_by_model[m] for m in ("teacher", "reflow")
                                              if m in straightness_by_model}}
    if "dpo" in models:  # the dpo issue's block: win rate over the reference on held-out seeds, rewards, drift
        feature_fn = None
        if classifier is not None:
            real_features = extract_features(classifier, reference)
            feature_fn = lambda x: frechet_distance(real_features, extract_features(classifier, x))  # noqa: E731
        val_labels = torch.from_numpy(val_y) if val_y is not None and kind == "points" else None
        def load_reference(rel: str) -> LoadedModel:
            return models.get(rel.removeprefix("models/")) or load_model(ctx.path(rel), data_manifest["shape"])

        metrics["dpo"] = alignment_block(
            models["dpo"], load_reference, n=n, seed=p.seed, real_x=torch.from_numpy(val_x), real_y=val_labels,
            classifier_dir=ctx.path("models/featurizer"), feature_fn=feature_fn)
    validate_metrics_schema(metrics)

    lineage = lineage_rows(ctx)
    write_html_report(report / "report.html", metrics, images, lineage)
    ctx.manifest.update({
        "evaluated_models": names,
        "skipped_models": list(skipped),
        "n_samples": n,
        "straightness_grid": f"euler, {p.straightness_steps} steps uniform in flow time s = sigma/(alpha+sigma), "
                             "states in the flow frame x/(alpha+sigma)",
        "model_lineage": lineage,
    })
    publish_table(results, floor, kind)
    ctx.run.log_artifacts(report, artifact_path="report")
    return metrics


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


def publish_table(results: dict, floor: dict[str, float], kind: str) -> None:
    """The models x NFE table as a Prefect table artifact (shown on the flow run page)."""
    from prefect.artifacts import create_table_artifact

    rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            for row in quality_table_rows(results)]
    floor_text = ", ".join(f"{k} = {v:.4g}" for k, v in floor.items())
    create_table_artifact(table=rows, key=TABLE_ARTIFACT_KEY,
                          description=f"Quality vs NFE ({kind} data); floor (real vs real): {floor_text}")


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
