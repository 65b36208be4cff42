"""Evaluation plots (PNG, matplotlib Agg through the object API, no pyplot global state) and plot tables.

``models`` arguments everywhere are the ``metrics["models"]`` mapping of metrics.json:
{model: {"nfe": {"1": {"sw2": ..., ...}, ...}}}.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_SCATTER_POINTS = 2000


def _new_figure(**kwargs) -> Figure:
    # matplotlib is imported on first use: importing components.evaluation (metrics) must not cost every
    # stage ~0.5 s of CPU for plotting code it never runs (benchmarks/bench_stage_overhead.py).
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(figure: Figure, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _numpy_2d(points: torch.Tensor | np.ndarray, name: str, max_points: int = MAX_SCATTER_POINTS) -> np.ndarray:
    array = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name}: expected 2-D points shaped [N, 2], got {array.shape}")
    return array[:max_points]


def _sorted_nfe_keys(nfe_entries: Mapping[str, object]) -> list[str]:
    return sorted(nfe_entries, key=int)


def scatter_grid(
    samples: Mapping[str, Mapping[int | str, torch.Tensor | np.ndarray]],
    real: torch.Tensor | np.ndarray,
    path: str | Path,
) -> Path:
    """Grid of 2-D scatter plots: one row per model, one column per NFE, real data in grey behind."""
    if not samples:
        raise ValueError("samples: needs at least one model")
    real_points = _numpy_2d(real, "real")
    columns = sorted({int(nfe) for per_nfe in samples.values() for nfe in per_nfe})
    if not columns:
        raise ValueError("samples: no NFE entries")
    limits = np.abs(real_points).max() * 1.3
    figure = _new_figure(figsize=(2.2 * len(columns), 2.2 * len(samples)))
    axes = figure.subplots(len(samples), len(columns), squeeze=False)
    for row, (model, per_nfe) in enumerate(samples.items()):
        by_int = {int(k): v for k, v in per_nfe.items()}
        for col, nfe in enumerate(columns):
            axis = axes[row][col]
            axis.scatter(real_points[:, 0], real_points[:, 1], s=1, c="0.75", linewidths=0)
            if nfe in by_int:
                points = _numpy_2d(by_int[nfe], f"samples[{model}][{nfe}]")
                axis.scatter(points[:, 0], points[:, 1], s=1, c="tab:blue", linewidths=0)
            axis.set_xlim(-limits, limits)
            axis.set_ylim(-limits, limits)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"NFE {nfe}", fontsize=9)
            if col == 0:
                axis.set_ylabel(model, fontsize=9)
    return _save(figure, path)


def image_grid(
    images: torch.Tensor, path: str | Path, nrow: int = 8, value_range: tuple[float, float] = (-1.0, 1.0)
) -> Path:
    """Tile images [N, C, H, W] (C = 1 or 3, values in value_range) into one PNG, ``nrow`` per row."""
    images = torch.as_tensor(images).detach().cpu().float()
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images: expected [N, 1|3, H, W] with N >= 1, got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    low, high = value_range
    unit = ((images - low) / (high - low)).clamp(0, 1)
    n, channels, height, width = unit.shape
    rows = -(-n // nrow)
    pad = 1
    canvas = torch.ones(channels, rows * (height + pad) + pad, nrow * (width + pad) + pad)
    for index in range(n):
        r, c = divmod(index, nrow)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[:, top : top + height, left : left + width] = unit[index]
    array = canvas.permute(1, 2, 0).numpy()
    figure = _new_figure(figsize=(max(2.0, array.shape[1] / 12), max(2.0, array.shape[0] / 12)))
    axis = figure.add_subplot()
    axis.imshow(array[..., 0] if channels == 1 else array, cmap="gray" if channels == 1 else None, vmin=0, vmax=1,
                interpolation="nearest")
    axis.set_axis_off()
    return _save(figure, path)


def model_samples_plot(
    model, path: str | Path, n: int, seed: int, real: torch.Tensor | np.ndarray | None = None, name: str = "samples"
) -> Path:
    """The default sampler of `model` (a LoadedModel) on the evaluation protocol's fixed noise and labels for `seed`:
    an image grid of the first 64, or a scatter of the n points over `real` (2-D data)."""
    from components.evaluation.protocol import fixed_noise_and_labels

    noise, cond = fixed_noise_and_labels(model, n, seed)
    result = model.sample(noise, cond=cond)
    if model.spec["kind"] == "image":
        return image_grid(result.x[:64], path, nrow=8)
    return scatter_grid({name: {result.nfe: result.x}}, real, path)


def quality_vs_nfe_figure(
    models: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    metric: str,
    floor: float | None = None,
    floor_sd: float | None = None,
) -> Figure:
    """``metric`` against NFE (log2 x axis), one line per model with its 95% interval (``<metric>_ci``) as a band;
    the floor (real vs real) dashed with a +-1 sd band (the floor draws' spread)."""
    figure = _new_figure(figsize=(5, 3.5))
    axis = figure.add_subplot()
    plotted = 0
    all_nfe: set[int] = set()
    for model, entry in models.items():
        nfe_entries = entry.get("nfe", {})
        keys = [k for k in _sorted_nfe_keys(nfe_entries) if metric in nfe_entries[k]]
        if not keys:
            continue
        nfes, values = [int(k) for k in keys], [nfe_entries[k][metric] for k in keys]
        (line,) = axis.plot(nfes, values, marker="o", label=model)
        intervals = [nfe_entries[k].get(f"{metric}_ci") for k in keys]
        if all(ci is not None for ci in intervals):
            axis.fill_between(nfes, [ci[0] for ci in intervals], [ci[1] for ci in intervals],
                              color=line.get_color(), alpha=0.2, linewidth=0)
        all_nfe.update(nfes)
        plotted += 1
    if plotted == 0:
        raise ValueError(f"metric {metric!r}: no model has values for it")
    if floor is not None:
        axis.axhline(floor, linestyle="--", color="0.4", label="floor (real vs real)")
        if floor_sd:
            axis.axhspan(floor - floor_sd, floor + floor_sd, color="0.4", alpha=0.15, linewidth=0)
    axis.set_xscale("log", base=2)
    # Plain integer tick labels (1, 2, 4, ...) read better than 2^k.
    axis.set_xticks(sorted(all_nfe), [str(n) for n in sorted(all_nfe)])
    axis.set_xlabel("NFE")
    axis.set_ylabel(f"{metric} (band: 95% interval)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return figure


def quality_vs_nfe(
    models: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    metric: str,
    path: str | Path,
    floor: float | None = None,
    floor_sd: float | None = None,
) -> Path:
    """quality_vs_nfe_figure written to a PNG."""
    return _save(quality_vs_nfe_figure(models, metric, floor, floor_sd), path)


def trajectory_plot(
    trajectory: Sequence[torch.Tensor] | torch.Tensor,
    path: str | Path,
    n_paths: int = 8,
    real: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """Plot the first ``n_paths`` 2-D sampling paths (states [K+1] x [B, 2], noise first) over real data."""
    states = trajectory if isinstance(trajectory, torch.Tensor) else torch.stack(list(trajectory))
    states = states.detach().cpu().numpy()
    if states.ndim != 3 or states.shape[2] != 2 or states.shape[0] < 2:
        raise ValueError(f"trajectory: expected [K+1 >= 2, B, 2] states, got {states.shape}")
    figure = _new_figure(figsize=(4, 4))
    axis = figure.add_subplot()
    if real is not None:
        real_points = _numpy_2d(real, "real")
        axis.scatter(real_points[:, 0], real_points[:, 1], s=1, c="0.8", linewidths=0)
    for index in range(min(n_paths, states.shape[1])):
        path_points = states[:, index]
        axis.plot(path_points[:, 0], path_points[:, 1], lw=0.8)
        axis.scatter(path_points[0, 0], path_points[0, 1], s=8, c="k", marker="x")
        axis.scatter(path_points[-1, 0], path_points[-1, 1], s=8, c="tab:red")
    axis.set_aspect("equal")
    axis.set_title("sampling paths (x: noise, dot: sample)", fontsize=9)
    return _save(figure, path)


def quality_table_rows(models: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> list[dict]:
    """Flatten the models mapping into rows {"model": m, "nfe": n, <metric>: value, ...}, sorted by model, nfe."""
    rows = []
    for model in sorted(models):
        nfe_entries = models[model].get("nfe", {})
        for key in _sorted_nfe_keys(nfe_entries):
            rows.append({"model": model, "nfe": int(key), **nfe_entries[key]})
    return rows


def write_quality_table(models: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], path: str | Path) -> Path:
    """Write the flat quality-vs-NFE table for ``dvc plots``: a JSON list of rows (.json) or CSV (.csv)."""
    path = Path(path)
    rows = quality_table_rows(models)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        fields = ["model", "nfe"] + sorted({k for row in rows for k in row} - {"model", "nfe"})
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"path: suffix must be .json or .csv, got {path.suffix!r}")
    return path


def write_quality_tables_per_model(
    models: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], directory: str | Path
) -> dict[str, Path]:
    """One JSON table per model (``<directory>/<model>.json``), so a DVC plot can draw one line per model."""
    directory = Path(directory)
    return {
        model: write_quality_table({model: models[model]}, directory / f"{model}.json") for model in sorted(models)
    }
