"""The evaluation protocol v2 (DESIGN.md, "Evaluation protocol" and "Uncertainty"): reference sets and floors,
scoring with intervals, the sampler x grid sweep at every NFE, ties against the teacher's best and
the headline numbers. The evaluate flow wires these together.

Reference sets:
- toy 2-D data (generated): fresh draws of the source with seeds of their own (`HELDOUT_SEED` + k), never the
  training data: one reference set of n and `FLOOR_DRAWS` floor sets of n, so 10k generated vs 10k real at every
  point without touching the shards (the shard stage and its training data stay as they are).
- other point data: the val split (reference n = val count // 2; floor sets: the other half, redrawn per draw).
- images: the train split is the reference (its features computed once); generated sets have n = the size of the
  floor's real sets (val count // 2 by default), each floor draw a random half of val: matched n.

Sweep: a model whose sampler is free (not progressive's per-step students) is sampled at every NFE with every
candidate (method, grid) whose step count fits the budget, on `n_sweep` points from a noise seed of its own
(common to all candidates); the candidate with the lowest primary metric (sw2 / fd) is then scored on the main
noise and n points. Selection and scoring use different noise, so the best score carries no winner's-curse bias.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from components.diffusion.consistency import ConsistencyFunction
from components.diffusion.samplers import sampling_grid, steps_for_nfe
from components.evaluation.featurizer import ReferenceClassifier, extract_features, predict_labels
from components.evaluation.metrics import knn_precision_recall
from components.evaluation.uncertainty import (Estimate, Floor, PointMetrics, below_floor, fd_with_interval,
                                               floor_from_values, intervals_overlap, kid, kid_values,
                                               mean_interval, off_support_fraction, wilson_interval)

HELDOUT_SEED = 7_919_000  # fresh toy draws: seeds HELDOUT_SEED + k (training data uses data.seed)
FLOOR_DRAWS = 10
SWEEP_NOISE_OFFSET = 1000  # the sweep's noise seed = evaluate.seed + this
PRIMARY = {"points": "sw2", "image": "fd"}
HEADLINE_NFE = (1, 2, 4)

Log = Callable[[str], None]


# --------------------------------------------------------------------------- reference and scoring


@dataclass
class Reference:
    """Everything computed once per stage: the reference set's statistics, the floors, the scoring."""

    kind: str
    dataset: str
    n: int                              # generated samples per scored point
    floors: dict[str, Floor]
    score: Callable[[torch.Tensor, Optional[torch.Tensor]], dict[str, Any]]
    quick: Callable[[torch.Tensor], float]  # primary metric on a sweep-sized set (selection only)
    points: Optional[torch.Tensor] = None  # 2-D: reference points (plots)
    description: str = ""


def toy_heldout(name: str, n: int, draw: int) -> torch.Tensor:
    from components.data.sources import make_toy2d

    return torch.from_numpy(make_toy2d(name, n, HELDOUT_SEED + draw)[0])


def entry_from(estimates: dict[str, Estimate], floors: dict[str, Floor]) -> dict[str, Any]:
    """metrics.json entry: value, _ci, and for metrics with a floor _ratio, _ratio_ci and _below_floor."""
    entry: dict[str, Any] = {}
    for name, est in estimates.items():
        entry.update(est.as_dict(name))
        if name in floors and floors[name].mean > 0:
            entry.update(floors[name].ratio(est).as_dict(f"{name}_ratio"))
            entry[f"{name}_below_floor"] = below_floor(est, floors[name])
    return entry


def points_reference(dataset: str, val_x: torch.Tensor, n_requested: Optional[int], n_sweep: int,
                     log: Log) -> Reference:
    metrics = PointMetrics(val_x.shape[1])
    toy = dataset in ("checkerboard", "moons", "eight_gaussians", "spirals")
    if toy:
        n = n_requested or 10_000
        ref = metrics.prepare(toy_heldout(dataset, n, 0))
        real_sets = [metrics.prepare(toy_heldout(dataset, n, k + 1)) for k in range(FLOOR_DRAWS)]
        description = f"fresh {dataset} draws (seeds {HELDOUT_SEED}+k), not the training data"
    else:
        n = n_requested or len(val_x) // 2
        if 2 * n > len(val_x):
            raise ValueError(f"evaluate.n_samples={n} needs {2 * n} held-out samples, the val split has {len(val_x)}")
        order = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(0))
        ref = metrics.prepare(val_x[order[:n]])
        rest = val_x[order[n:]]
        g = torch.Generator().manual_seed(1)
        real_sets = [metrics.prepare(rest[torch.randperm(len(rest), generator=g)[:n]]) for _ in range(FLOOR_DRAWS)]
        description = "val split: one half the reference, random n of the other half per floor draw"
    floors = metrics.floors(real_sets, ref)
    off_real = [off_support_fraction(r.x, dataset) for r in real_sets]
    if off_real[0] is not None:
        floors["off_support"] = floor_from_values([e.value for e in off_real])
    log(f"reference: {n} points ({description}); floor sw2 {floors['sw2'].mean:.4g} +- {floors['sw2'].sd:.2g} "
        f"(sd over {FLOOR_DRAWS} draws)")
    sweep_ref = metrics.prepare(ref.x[:n_sweep])

    def score(x: torch.Tensor, cond: Optional[torch.Tensor]) -> dict[str, Any]:
        estimates = metrics.score(metrics.prepare(x), ref)
        off = off_support_fraction(x, dataset)
        if off is not None:
            estimates["off_support"] = off
        return entry_from(estimates, {k: v for k, v in floors.items() if k != "off_support"})

    def quick(x: torch.Tensor) -> float:
        return metrics.sw2_value(metrics.prepare(x), sweep_ref)

    return Reference("points", dataset, n, floors, score, quick, points=ref.x[:2000].float(), description=description)


def image_reference(dataset: str, classifier: ReferenceClassifier, train_x: torch.Tensor, val_x: torch.Tensor,
                    n_requested: Optional[int], log: Log) -> Reference:
    n = n_requested or len(val_x) // 2
    if n > len(val_x) or n < 10:
        raise ValueError(f"evaluate.n_samples={n}: the floor's real sets come from the val split "
                         f"({len(val_x)} images), so it must be between 10 and that count")
    ref_feats = extract_features(classifier, train_x).double()
    val_feats = extract_features(classifier, val_x).double()
    g = torch.Generator().manual_seed(0)
    draws = [val_feats[torch.randperm(len(val_feats), generator=g)[:n]] for _ in range(FLOOR_DRAWS)]
    floors = {"fd": floor_from_values([fd_with_interval(d, ref_feats, n_boot=0).value for d in draws]),
              "kid": floor_from_values([float(kid_values(d, ref_feats).mean()) for d in draws])}
    log(f"reference: train split ({len(train_x)} images); generated sets of {n} vs the floor's {FLOOR_DRAWS} draws of "
        f"{n} val images; floor fd {floors['fd'].mean:.4g} +- {floors['fd'].sd:.2g}")

    def score(x: torch.Tensor, cond: Optional[torch.Tensor]) -> dict[str, Any]:
        feats = extract_features(classifier, x).double()
        estimates = {"fd": fd_with_interval(feats, ref_feats), "kid": kid(feats, ref_feats)}
        pr = knn_precision_recall(ref_feats, feats, k=3)
        estimates["precision"] = wilson_interval(round(pr["precision"] * len(feats)), len(feats))
        estimates["recall"] = wilson_interval(round(pr["recall"] * len(ref_feats)), len(ref_feats))
        if cond is not None:
            labelled = cond < classifier.config.num_classes
            if bool(labelled.any()):
                hits = int((predict_labels(classifier, x[labelled]) == cond[labelled]).sum())
                estimates["class_accuracy"] = wilson_interval(hits, int(labelled.sum()))
        return entry_from(estimates, floors)

    def quick(x: torch.Tensor) -> float:
        return fd_with_interval(extract_features(classifier, x).double(), ref_feats, n_boot=0).value

    return Reference("image", dataset, n, floors, score, quick, description="train split features")


# --------------------------------------------------------------------------- sampling


@dataclass
class Candidate:
    method: str
    grid: str

    @property
    def label(self) -> str:
        return f"{self.method}/{self.grid}"


def default_candidate(model) -> Candidate:
    sampler = model.spec["sampler"]
    return Candidate(sampler["method"], sampler.get("grid", "edm"))


def candidates_for(model, methods: list[str], grids: list[str]) -> list[Candidate]:
    """The sampler x grid candidates of a model: consistency models only sample with "consistency"; progressive's
    students only with the sampler they were distilled for (their default). On an affine schedule (EDM, flow)
    DDIM is Euler, so it is not swept beside Euler (it would only cost time and win or lose by rounding)."""
    if model.spec.get("students"):
        return [default_candidate(model)]
    if isinstance(model.denoiser, ConsistencyFunction):
        return [Candidate("consistency", g) for g in grids]
    if model.schedule.affine and "euler" in methods:
        methods = [m for m in methods if m != "ddim"]
    return [Candidate(m, g) for m in methods for g in grids]


def steps_within(model, candidate: Candidate, nfe: int, guided: bool) -> Optional[int]:
    per_call = 2 if guided else 1
    try:
        return steps_for_nfe(candidate.method, max(1, nfe // per_call))
    except ValueError:
        return None


def generate(model, candidate: Candidate, nfe: int, noise: torch.Tensor, cond: Optional[torch.Tensor],
             seed: int) -> tuple[torch.Tensor, int, float]:
    """Samples of `model` at budget `nfe` with `candidate`; returns (x, counted NFE, seconds per sample)."""
    start = time.perf_counter()
    if model.spec.get("students"):
        result = model.sample(noise, nfe=nfe, cond=cond, generator=torch.Generator().manual_seed(seed))
    else:
        result = model.sample(noise, nfe=nfe, method=candidate.method, grid=candidate.grid, cond=cond,
                              generator=torch.Generator().manual_seed(seed))
    return result.x, int(result.nfe), (time.perf_counter() - start) / noise.shape[0]


def fixed_noise_and_labels(model, n: int, seed: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The evaluation noise [n, *data_shape] and, for a conditional model, balanced labels i % num_classes."""
    noise = torch.randn((n, *model.spec["data_shape"]), generator=torch.Generator().manual_seed(seed))
    cond = torch.arange(n) % model.num_classes if model.num_classes else None
    return noise, cond


# --------------------------------------------------------------------------- one model


@dataclass
class ModelResult:
    entry: dict[str, Any]                                   # {"sampler", "nfe": {...}, "best": {...}, "sweep": {...}}
    samples: dict[int, torch.Tensor] = field(default_factory=dict)  # default sampler, per NFE (plots)
    best_samples: dict[int, torch.Tensor] = field(default_factory=dict)


def evaluate_model(name: str, model, reference: Reference, nfe_grid: list[int], seed: int, n_sweep: int,
                   methods: list[str], grids: list[str], log: Log) -> ModelResult:
    """Default sampler at every NFE (the DESIGN.md entry), and the best candidate per NFE (selected on the sweep's
    own noise, scored on the main noise)."""
    noise, cond = fixed_noise_and_labels(model, reference.n, seed)
    sweep_noise, sweep_cond = fixed_noise_and_labels(model, n_sweep, seed + SWEEP_NOISE_OFFSET)
    guided = cond is not None and float(model.spec["sampler"].get("guidance", 1.0)) != 1.0
    default = default_candidate(model)
    candidates = candidates_for(model, methods, grids)
    result = ModelResult({"sampler": default.label, "nfe": {}, "best": {}, "sweep": {}})
    scored: dict[tuple[str, int], dict[str, Any]] = {}

    def score(candidate: Candidate, nfe: int) -> dict[str, Any]:
        x, actual, sec = generate(model, candidate, nfe, noise, cond, seed + 1)
        key = (candidate.label, actual)
        if key not in scored:  # budgets that buy the same steps give the same samples: score once
            scored[key] = {**reference.score(x, cond), "nfe_actual": actual, "sec_per_sample": sec,
                           "sampler": candidate.label}
        else:
            scored[key] = {**scored[key], "sec_per_sample": sec}
        return scored[key], x

    for nfe in nfe_grid:
        log(f"{name} NFE {nfe}: default sampler {default.label} on {reference.n} points")
        entry, x = score(default, nfe)
        result.entry["nfe"][str(nfe)] = entry
        result.samples[nfe] = x
        sweep: dict[str, float] = {}
        seen: dict[tuple, str] = {}
        if len(candidates) > 1:
            for candidate in candidates:
                steps = steps_within(model, candidate, nfe, guided)
                if steps is None:
                    continue
                times = tuple(sampling_grid(candidate.method, candidate.grid, model.schedule, steps).tolist())
                if (candidate.method, times) in seen:  # e.g. every grid kind is [t_max, t_end] at one step
                    continue
                seen[(candidate.method, times)] = candidate.label
                xs, _, _ = generate(model, candidate, nfe, sweep_noise, sweep_cond, seed + 1 + SWEEP_NOISE_OFFSET)
                sweep[candidate.label] = reference.quick(xs) if torch.isfinite(xs).all() else math.inf
            best_label = min(sweep, key=sweep.get)
            best = next(c for c in candidates if c.label == best_label)
        else:
            best = default
        result.entry["sweep"][str(nfe)] = sweep
        if len(sweep) > 1:
            log(f"{name} NFE {nfe}: swept {len(sweep)} candidates on {n_sweep} points; best {best.label}")
        if best.label == default.label:
            result.entry["best"][str(nfe)] = entry
            result.best_samples[nfe] = x
        else:
            result.entry["best"][str(nfe)], result.best_samples[nfe] = score(best, nfe)
        primary = PRIMARY[reference.kind]
        d, b = result.entry["nfe"][str(nfe)], result.entry["best"][str(nfe)]
        log(f"{name} NFE {nfe}: default {default.label} {primary} {d[f'{primary}_ratio']:.2f}x floor; best "
            f"{b['sampler']} {b[f'{primary}_ratio']:.2f}x [{b[f'{primary}_ratio_ci'][0]:.2f}, "
            f"{b[f'{primary}_ratio_ci'][1]:.2f}] ({len(sweep)} candidates swept)")
    return result


# --------------------------------------------------------------------------- verdicts and headline


def best_cell(entry: dict[str, Any], metric: str) -> tuple[str, dict[str, Any]]:
    """(nfe, cell) of a model's best sampler at its best NFE by `<metric>_ratio`."""
    nfe = min(entry["best"], key=lambda k: entry["best"][k][f"{metric}_ratio"])
    return nfe, entry["best"][nfe]


def mark_verdicts(models: dict[str, dict[str, Any]], metric: str, baseline: str = "teacher") -> Optional[dict]:
    """Each cell gets `vs_teacher_best`: "tie" when its ratio interval overlaps that of the teacher's best cell,
    else "better" / "worse". Returns the teacher's best {"nfe", "sampler", ratio, ci} (None without a teacher)."""
    if baseline not in models:
        return None
    nfe, cell = best_cell(models[baseline], metric)
    ref_ci = cell[f"{metric}_ratio_ci"]
    for entry in models.values():
        for table in (entry["nfe"], entry["best"]):
            for c in table.values():
                ci = c[f"{metric}_ratio_ci"]
                c["vs_teacher_best"] = ("tie" if intervals_overlap(ci, ref_ci)
                                        else "better" if ci[1] < ref_ci[0] else "worse")
    return {"nfe": int(nfe), "sampler": cell["sampler"], f"{metric}_ratio": cell[f"{metric}_ratio"],
            f"{metric}_ratio_ci": ref_ci}


def headline(models: dict[str, dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    """Per model: best-sampler ratio at NFE 1, 2, 4 and at its best NFE, each with its interval (small enough for
    `dvc exp show`)."""
    out: dict[str, dict[str, Any]] = {}
    key = f"{metric}_ratio"
    for name, entry in models.items():
        row: dict[str, Any] = {}
        for nfe in HEADLINE_NFE:
            cell = entry["best"].get(str(nfe))
            if cell is not None:
                row[f"nfe{nfe}"] = round(cell[key], 4)
                row[f"nfe{nfe}_ci"] = [round(v, 4) for v in cell[f"{key}_ci"]]
        nfe, cell = best_cell(entry, metric)
        lo, hi = (round(v, 4) for v in cell[f"{key}_ci"])
        # best_lo / best_hi as numbers: `dvc metrics show` / `dvc exp show` skip lists (the nfe<N>_ci stay in the file)
        row.update({"best": round(cell[key], 4), "best_lo": lo, "best_hi": hi, "best_nfe": int(nfe)})
        out[name] = row
    return out


def results_rows(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The tidy table: one row per (model, NFE, which = default | best), intervals as _lo / _hi columns."""
    rows = []
    for name, entry in models.items():
        for which in ("nfe", "best"):
            for nfe in sorted(entry[which], key=int):
                row: dict[str, Any] = {"model": name, "nfe": int(nfe), "which": "default" if which == "nfe" else "best"}
                for k, v in entry[which][nfe].items():
                    if isinstance(v, list):
                        row[f"{k.removesuffix('_ci')}_lo"], row[f"{k.removesuffix('_ci')}_hi"] = v
                    else:
                        row[k] = v
                rows.append(row)
    return rows


class Progress:
    """Progress lines with the elapsed time; a heartbeat thread repeats the current step every `heartbeat` seconds
    while one step runs longer (sampling 10k points at NFE 64 does), so a line appears at least that often."""

    def __init__(self, log: Log, heartbeat: float = 25.0) -> None:
        import threading

        self._log, self.start = log, time.perf_counter()
        self._last, self._current = self.start, "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True)
        self._thread.start()

    def _beat(self, heartbeat: float) -> None:
        while not self._stop.wait(min(1.0, heartbeat / 3)):
            if time.perf_counter() - self._last >= heartbeat:
                self(f"... still on: {self._current}")

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        self._last = now
        if not message.startswith("..."):
            self._current = message
        self._log(f"[{now - self.start:6.1f} s] {message}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
