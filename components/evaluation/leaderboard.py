"""The evaluate stage's work between reading its inputs and recording its outputs: every model scored by the protocol
(protocol.py) into the metrics.json document and its headline, the plots, results.csv and the HTML report, the DPO
alignment block, the MLflow metric names and the rows of the Prefect table. flows/evaluate.py wires these to DVC,
Prefect and MLflow.
"""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from components.config import EvaluateParams
from components.data.shards import read_shard_manifest, read_split
from components.errors import DataError
from components.evaluation import protocol
from components.evaluation.featurizer import (MissingDependencyError, extract_features, inception_fid,
                                              load_classifier)
from components.evaluation.metrics import frechet_distance
from components.evaluation.plots import (image_grid, quality_vs_nfe, scatter_grid, trajectory_plot,
                                         write_quality_tables_per_model)
from components.evaluation.report import write_html_report
from components.evaluation.straightness import path_straightness
from components.evaluation.uncertainty import Estimate
from components.models.store import SPEC_FILE, WEIGHTS_FILE, LoadedModel, load_denoiser
from components.tracking.lineage import MANIFEST

PLOT_METRICS = {"points": ("sw2", "w2", "off_support"), "image": ("fd", "kid", "recall", "class_accuracy", "fid")}
RESULTS_CSV = "results.csv"

Log = Callable[[str], None]


# --------------------------------------------------------------------------- inputs


def check_model_dir(directory: Path) -> None:
    """A model dir holds weights, spec and lineage manifest."""
    missing = [f for f in (WEIGHTS_FILE, SPEC_FILE, MANIFEST) if not (Path(directory) / f).is_file()]
    if missing:
        raise DataError(f"{directory} is not a complete model directory: missing {', '.join(missing)}")


def check_sample_sizes(shard_manifest: dict, p: EvaluateParams) -> None:
    """evaluate.n_samples fits the held-out data: image floors draw from val; non-toy points need 2 n in val."""
    if p.n_samples is None:
        return
    val_count = int(shard_manifest["splits"]["val"]["count"])
    if shard_manifest["kind"] == "image" and p.n_samples > val_count:
        raise DataError(f"evaluate.n_samples={p.n_samples}: the floor's real image sets come from the val split, "
                        f"which has {val_count}; lower it")
    toy = shard_manifest["source"].get("source") == "toy2d"
    if shard_manifest["kind"] == "points" and not toy and 2 * p.n_samples > val_count:
        raise DataError(f"evaluate.n_samples={p.n_samples} needs {2 * p.n_samples} held-out samples (reference "
                        f"+ floor sets), but the val split has {val_count}; lower it or use more data")


def load_model(directory: Path, data_shape: list[int]) -> LoadedModel:
    """A complete model dir whose data shape is that of the shards."""
    check_model_dir(directory)
    model = load_denoiser(directory)
    if list(model.spec.get("data_shape", [])) != list(data_shape):
        raise DataError(f"{directory} was trained on data shape {model.spec.get('data_shape')}, "
                        f"but data/shards holds {list(data_shape)}")
    return model


def inception_request(p: EvaluateParams, repo: Path, kind: str, warn: Log) -> Optional[Path]:
    """The Inception weights file to use, or None; a missing file is an error unless allowed."""
    if not p.inception_weights:
        return None
    if kind != "image":
        warn("evaluate.inception_weights is ignored for 2-D data")
        return None
    path = Path(p.inception_weights)
    path = path if path.is_absolute() else repo / path
    if not path.is_file():
        message = f"evaluate.inception_weights: file not found: {p.inception_weights}"
        if not p.allow_missing_inception:
            raise DataError(message + " (set evaluate.allow_missing_inception: true to skip Inception-FID)")
        warn(message + "; Inception-FID skipped (allow_missing_inception)")
        return None
    return path


def with_inception_fid(score_fn, real: torch.Tensor, weights: Path, allow_missing: bool, warn: Log):
    """Extend an image score function with Inception-FID against the same held-out reference."""
    def score(samples: torch.Tensor, cond: Optional[torch.Tensor]) -> dict[str, Any]:
        scores = score_fn(samples, cond)
        try:
            scores["fid"] = inception_fid(real, samples, weights)
        except MissingDependencyError as e:
            if not allow_missing:
                raise DataError(f"evaluate.inception_weights: {e}") from None
            warn(f"Inception-FID skipped: {e}")
        return scores
    return score


def build_reference(shards: Path, featurizer_dir: Path, p: EvaluateParams, repo: Path, log: Log,
                    warn: Log) -> protocol.Reference:
    """The protocol's reference (held-out sets, floors, scoring) for the shards' data; bad sizes are DataErrors."""
    manifest = read_shard_manifest(shards)
    kind = manifest["kind"]
    dataset = manifest["source"].get("name") or manifest["source"]["source"]
    val_x, _ = read_split(shards, "val")
    try:
        if kind != "image":
            return protocol.points_reference(dataset, torch.from_numpy(val_x), p.n_samples, p.n_sweep, log)
        try:
            classifier = load_classifier(featurizer_dir)
        except FileNotFoundError:
            raise DataError(f"{featurizer_dir} holds no reference classifier (rerun `dvc repro featurizer` "
                            "after switching to image data)") from None
        train_x, _ = read_split(shards, "train")
        reference = protocol.image_reference(dataset, classifier, torch.from_numpy(train_x),
                                             torch.from_numpy(val_x), p.n_samples, log)
    except ValueError as e:
        raise DataError(str(e)) from None
    inception = inception_request(p, repo, kind, warn)
    if inception is not None:
        reference.score = with_inception_fid(reference.score, torch.from_numpy(train_x), inception,
                                             p.allow_missing_inception, warn)
    return reference


# --------------------------------------------------------------------------- scoring


@dataclass
class Leaderboard:
    metrics: dict[str, Any]     # metrics.json (the dpo block is added by the caller when there is a dpo model)
    headline: dict[str, Any]    # headline.json: best ratios at NFE 1, 2, 4 and at the best NFE
    images: dict[str, Path]     # caption -> plot file in the report dir

    @property
    def results(self) -> dict[str, Any]:
        return self.metrics["models"]


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


ModelScore = tuple[protocol.ModelResult, Estimate, torch.Tensor]  # (result, straightness, ODE states for the plot)


def score_model(name: str, model: LoadedModel, reference: protocol.Reference, p: EvaluateParams,
                progress: Log) -> ModelScore:
    """One model: default and best sampler x grid at every NFE with intervals, and its straightness."""
    progress(f"{name}: sampling at NFE {p.nfe} ({reference.n} points each; sweep on {p.n_sweep})")
    result = protocol.evaluate_model(name, model, reference, p.nfe, p.seed, p.n_sweep, p.samplers, p.grids, progress)
    noise, cond = protocol.fixed_noise_and_labels(model, min(reference.n, p.straightness_samples), p.seed)
    estimate, states = path_straightness(model, noise, cond, p.straightness_steps)
    progress(f"{name}: done (straightness {estimate.value:.4f})")
    return result, estimate, states


@dataclass
class RankSplit:
    """Score the models on launched ranks (the `distributed` section): each rank rebuilds the same reference and
    scores every world-size-th model into `work`; the stage reads them back in model order. Every model's numbers
    depend only on its own seeds, so the result is the one process's."""

    models: dict[str, Path]
    shards: Path
    featurizer: Path
    repo: Path
    work: Path
    params: EvaluateParams
    distributed: Any  # DistributedParams


def scores_from_ranks(split: RankSplit, progress: Log) -> dict[str, ModelScore]:
    from components.training.recipe import launch_worker, task_ref

    shutil.rmtree(split.work, ignore_errors=True)
    args = {"models": {k: str(v) for k, v in split.models.items()}, "shards": str(split.shards),
            "featurizer": str(split.featurizer), "repo": str(split.repo), "work": str(split.work.resolve()),
            "params": split.params.model_dump(mode="json")}
    progress(f"scoring {len(split.models)} models on {split.distributed.world_size} ranks")
    launch_worker({"call": task_ref(score_share), "job": args}, split.work, split.distributed.processes_per_node,
                  split.distributed.nodes, split.distributed.timeout_s, "evaluate ranks")
    scores = {}
    for name in split.models:
        saved = torch.load(split.work / f"{name}.pt", weights_only=True)  # tensors and a JSON string: no unpickling
        scores[name] = (protocol.ModelResult(json.loads(saved["entry"]), saved["samples"], saved["best_samples"]),
                        Estimate(*saved["straightness"]), saved["states"])
    shutil.rmtree(split.work, ignore_errors=True)
    return scores


def score_share(args: dict[str, Any]) -> None:
    """One launched rank of :func:`scores_from_ranks`."""
    from components.io import world_info
    from components.training.distributed import rank_share

    rank, _ = world_info()
    p = EvaluateParams(**args["params"])
    def log(message: str) -> None:  # the reference is the same on every rank: rank 0 says it once
        if rank == 0:
            print(message, flush=True)

    reference = build_reference(Path(args["shards"]), Path(args["featurizer"]), p, Path(args["repo"]), log, log)
    names = list(args["models"])
    shape = read_shard_manifest(Path(args["shards"]))["shape"]
    for i in rank_share(len(names)):
        name = names[i]
        model = load_model(Path(args["models"][name]), shape)
        result, estimate, states = score_model(name, model, reference, p,
                                               lambda message: print(f"[rank {rank}] {message}", flush=True))
        path = Path(args["work"]) / f"{name}.pt"
        entry = json.dumps(result.entry, default=lambda v: v.item())  # numpy scalars -> their Python values
        torch.save({"entry": entry, "samples": result.samples, "best_samples": result.best_samples,
                    "straightness": [float(estimate.value), float(estimate.lo), float(estimate.hi)], "states": states},
                   path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)


def score_models(models: dict[str, LoadedModel], reference: protocol.Reference, p: EvaluateParams, report: Path,
                 progress: Log, ranks: Optional[RankSplit] = None) -> Leaderboard:
    """Per model (in this process, or on `ranks`): default and best sampler x grid at every NFE with intervals,
    straightness and its plots; then the verdicts against the teacher's best, the quality-vs-NFE plots and the
    metrics.json document."""
    kind = reference.kind
    metric = protocol.PRIMARY[kind]
    results: dict[str, Any] = {}
    straightness: dict[str, Any] = {}
    images: dict[str, Path] = {}
    scores = (scores_from_ranks(ranks, progress) if ranks is not None
              else {name: score_model(name, model, reference, p, progress) for name, model in models.items()})
    for name in models:
        result, estimate, states = scores[name]
        straightness[name] = estimate.value
        straightness[f"{name}_ci"] = [estimate.lo, estimate.hi]
        results[name] = result.entry
        images.update(model_plots(name, result, states, reference, report, p.image_grid_size))
    teacher_best = protocol.mark_verdicts(results, metric)
    best_tables = {m: {"nfe": r["best"]} for m, r in results.items()}
    for plotted in PLOT_METRICS[kind]:
        if any(plotted in entry for r in results.values() for entry in r["best"].values()):
            floor = reference.floors.get(plotted)
            images[f"{plotted} vs NFE (best sampler)"] = quality_vs_nfe(
                best_tables, plotted, report / f"{plotted}_vs_nfe.png", floor=floor.mean if floor else None,
                floor_sd=floor.sd if floor else None)
    write_quality_tables_per_model(best_tables, report / "plots")
    metrics: dict[str, Any] = {
        "dataset": reference.dataset,
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
    head = {"metric": f"{metric}_ratio", "models": protocol.headline(results, metric)}
    return Leaderboard(metrics, head, images)


def dpo_block(models: dict[str, LoadedModel], reference: protocol.Reference, shards: Path, featurizer_dir: Path,
              repo: Path, seed: int) -> dict:
    """The dpo issue's block: win rate of models["dpo"] over its reference model on held-out seeds, rewards, drift."""
    from components.preferences.alignment import alignment_block

    val_x, val_y = read_split(shards, "val")
    feature_fn = None
    if reference.kind == "image":
        classifier = load_classifier(featurizer_dir)
        real_features = extract_features(classifier, torch.from_numpy(val_x))
        feature_fn = lambda x: frechet_distance(real_features, extract_features(classifier, x))  # noqa: E731
    val_labels = torch.from_numpy(val_y) if val_y is not None and reference.kind == "points" else None
    n = min(reference.n, len(val_x) // 2)

    def load_reference(rel: str) -> LoadedModel:
        return models.get(rel.removeprefix("models/")) or load_model(repo / rel, models["dpo"].spec["data_shape"])

    return alignment_block(models["dpo"], load_reference, n=n, seed=seed, real_x=torch.from_numpy(val_x),
                           real_y=val_labels, classifier_dir=featurizer_dir, feature_fn=feature_fn)


# --------------------------------------------------------------------------- outputs


def lineage_rows(input_records: list[dict]) -> dict[str, dict[str, Any]]:
    """Which MLflow run (and commit) produced each input (data, featurizer, every model), from the stage's input
    records."""
    fields = {"stage": "stage", "mlflow_run_id": "run_id", "git_commit": "git_commit", "digest": "digest",
              "digest_source": "digest_source"}
    return {record["path"]: {column: record.get(key) or "" for column, key in fields.items()}
            for record in input_records}


def write_results_csv(rows: list[dict], path: Path) -> Path:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_report(board: Leaderboard, report: Path, lineage: dict[str, dict[str, Any]]) -> None:
    """results.csv (one tidy row per model x NFE x default/best) and report.html beside the plots."""
    write_results_csv(protocol.results_rows(board.results), report / RESULTS_CSV)
    write_html_report(report / "report.html", board.metrics, board.images, lineage)


def mlflow_series(results: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Quality vs NFE as MLflow series, {NFE (the step): metrics}: `<model>.<metric>` for the default sampler and
    `<model>.best.<metric>` for the best one, intervals as `_lo` / `_hi`."""
    series: dict[int, dict[str, float]] = {}
    for name, entry in results.items():
        for which, prefix in (("nfe", name), ("best", f"{name}.best")):
            for nfe, cell in entry[which].items():
                values = series.setdefault(int(nfe), {})
                values.update({f"{prefix}.{k}": v for k, v in cell.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)})
                values.update({f"{prefix}.{k.removesuffix('_ci')}_{end}": v[i] for k, v in cell.items()
                               if isinstance(v, list) for i, end in enumerate(("lo", "hi"))})
    return series


def headline_metrics(head: dict[str, Any]) -> dict[str, float]:
    """The headline under plain MLflow names: `<model>_best`, `<model>_nfe1`, `<model>_best_lo`, ..."""
    plain = {}
    for name, row in head["models"].items():
        for k, v in row.items():
            if isinstance(v, list):
                plain[f"{name}_{k.removesuffix('_ci')}_lo"], plain[f"{name}_{k.removesuffix('_ci')}_hi"] = v
            else:
                plain[f"{name}_{k}"] = v
    return plain


def best_table(results: dict[str, Any], reference: protocol.Reference) -> tuple[list[dict], str]:
    """The models x NFE table (best sampler, intervals) and its description, for a table artifact."""
    rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            for row in protocol.results_rows(results) if row["which"] == "best"]
    floor_text = ", ".join(f"{k} = {f.mean:.4g} +- {f.sd:.2g}" for k, f in reference.floors.items())
    return rows, (f"Quality vs NFE, best sampler ({reference.kind} data); floor (real vs real, mean +- sd over "
                  f"{protocol.FLOOR_DRAWS} draws): {floor_text}")
