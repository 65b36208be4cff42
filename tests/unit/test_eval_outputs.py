"""Plots, plot tables, HTML report and the metrics.json schema validator."""

from __future__ import annotations

import copy
import csv
import json
import time

import pytest
import torch

from components.evaluation.plots import (
    image_grid,
    quality_vs_nfe,
    quality_vs_nfe_figure,
    scatter_grid,
    trajectory_plot,
    write_quality_table,
    write_quality_tables_per_model,
)
from components.evaluation.report import MetricsSchemaError, validate_metrics_schema, write_html_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _valid_2d_metrics() -> dict:
    entry = {"sw2": 0.1, "sw2_ratio": 2.0, "mmd": 0.01, "mmd_ratio": 3.0, "sec_per_sample": 1e-4}
    return {
        "dataset": "checkerboard",
        "floor": {"sw2": 0.05, "mmd": 0.003},
        "models": {
            "teacher": {"nfe": {"1": dict(entry), "8": dict(entry, sw2=0.06)}},
            "reflow": {"nfe": {}},
        },
        "reflow": {"straightness": {"teacher": 0.4, "reflow": 0.01}},
        "dpo": {"win_rate": 0.6, "reward_mean": {"reference": 0.1, "dpo": 0.2}, "implicit_accuracy": 0.7},
    }


# ------------------------------------------------------------------ plots and tables


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plots_are_written(tmp_path):
    generator = torch.Generator().manual_seed(2)
    real = torch.randn(200, 2, generator=generator)
    samples = {"teacher": {1: real * 2, 8: real * 1.1}, "reflow": {1: real * 1.2}}
    _assert_png(scatter_grid(samples, real, tmp_path / "scatter.png"))
    _assert_png(image_grid(torch.rand(10, 3, 8, 8, generator=generator) * 2 - 1, tmp_path / "grid.png", nrow=4))
    _assert_png(image_grid(torch.rand(3, 1, 8, 8, generator=generator), tmp_path / "grey.png", value_range=(0, 1)))
    metrics = _valid_2d_metrics()
    _assert_png(quality_vs_nfe(metrics["models"], "sw2", tmp_path / "sw2.png", floor=metrics["floor"]["sw2"]))
    trajectory = torch.stack([real[:5] * (1 - t) for t in torch.linspace(0, 0.9, 6)])
    _assert_png(trajectory_plot(trajectory, tmp_path / "paths.png", n_paths=3, real=real))
    with pytest.raises(ValueError, match="fid"):
        quality_vs_nfe(metrics["models"], "fid", tmp_path / "none.png")


def test_quality_plot_draws_each_interval_as_a_band_and_the_floor_with_its_sd():
    from matplotlib.collections import PolyCollection

    cell = {"1": {"sw2": 0.30, "sw2_ci": [0.25, 0.40]}, "4": {"sw2": 0.10, "sw2_ci": [0.08, 0.13]},
            "16": {"sw2": 0.06, "sw2_ci": [0.05, 0.07]}}
    models = {"teacher": {"nfe": cell}, "reflow": {"nfe": {"1": {"sw2": 0.2}, "4": {"sw2": 0.1}}}}  # no intervals
    axis = quality_vs_nfe_figure(models, "sw2", floor=0.05, floor_sd=0.01).axes[0]
    bands = [c for c in axis.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # the teacher's; the reflow line has no intervals to draw
    outline = bands[0].get_paths()[0].vertices
    for nfe, entry in cell.items():  # the band spans [lo, hi] at every NFE
        ys = outline[outline[:, 0] == int(nfe)][:, 1]
        assert sorted(set(ys.round(9))) == entry["sw2_ci"]
    floor_band = [p for p in axis.patches if p.get_path().vertices.size]
    assert len(floor_band) == 1
    ys = floor_band[0].get_transform().transform(floor_band[0].get_path().vertices)[:, 1]
    lo, hi = axis.transData.inverted().transform([[0, ys.min()], [0, ys.max()]])[:, 1]
    assert (round(lo, 9), round(hi, 9)) == (0.04, 0.06)


def test_quality_tables_are_flat_rows(tmp_path):
    models = _valid_2d_metrics()["models"]
    rows = json.loads(write_quality_table(models, tmp_path / "q.json").read_text())
    assert [(r["model"], r["nfe"]) for r in rows] == [("teacher", 1), ("teacher", 8)]
    assert rows[1]["sw2"] == 0.06
    with write_quality_table(models, tmp_path / "q.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [float(r["sw2"]) for r in csv_rows] == [0.1, 0.06]
    per_model = write_quality_tables_per_model(models, tmp_path / "per_model")
    assert sorted(per_model) == ["reflow", "teacher"]
    assert json.loads(per_model["reflow"].read_text()) == []
    with pytest.raises(ValueError, match="suffix"):
        write_quality_table(models, tmp_path / "q.txt")


# ------------------------------------------------------------------ report


def test_html_report_has_table_images_and_lineage(tmp_path):
    metrics = _valid_2d_metrics()
    plot = quality_vs_nfe(metrics["models"], "sw2", tmp_path / "plots" / "sw2.png", floor=0.05)
    lineage = {"teacher": {"run_id": "abc123", "stage": "teacher"}, "reflow": {"run_id": "<def>", "stage": "reflow"}}
    report = write_html_report(
        tmp_path / "report.html", metrics, {"sw2 vs NFE": plot, "samples": tmp_path / "plots" / "x.svg"}, lineage
    )
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "data:image/png;base64," in page  # PNG embedded, page self-contained
    assert 'href="plots/x.svg"' in page  # non-PNG linked relatively
    assert "abc123" in page and "&lt;def&gt;" in page  # lineage, escaped
    assert "sw2_ratio" in page and "teacher" in page and "straightness" in page and "win_rate" in page
    assert "http://" not in page and "https://" not in page


# ------------------------------------------------------------------ schema


def test_schema_accepts_valid_2d_and_image_metrics():
    validate_metrics_schema(_valid_2d_metrics())
    image_entry = {"fd": 3.0, "fd_ratio": 1.5, "precision": 0.8, "recall": 0.7, "class_accuracy": 0.9,
                   "sec_per_sample": 0.01, "nfe_actual": 7}
    validate_metrics_schema({"dataset": "digits", "floor": {"fd": 2.0}, "models": {"teacher": {"nfe": {"4": image_entry}}}})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.pop("floor"), "missing required key 'floor'"),
        (lambda m: m.pop("dataset"), "missing required key 'dataset'"),
        (lambda m: m["floor"].pop("mmd"), r"metrics.floor: missing required key 'mmd'"),
        (lambda m: m["models"]["teacher"]["nfe"]["1"].pop("sec_per_sample"), r"teacher.nfe.1: missing required key 'sec_per_sample'"),
        (lambda m: m["models"]["teacher"]["nfe"]["8"].pop("sw2_ratio"), "missing required key 'sw2_ratio'"),
        (lambda m: m["models"]["reflow"].pop("nfe"), r"models.reflow: missing required key 'nfe'"),
        (lambda m: m["models"]["teacher"]["nfe"].update({"0": m["models"]["teacher"]["nfe"]["1"]}), "int >= 1"),
        (lambda m: m["models"]["teacher"]["nfe"]["1"].update(mmd="x"), r"nfe.1.mmd: expected a number"),
        (lambda m: m["models"]["teacher"]["nfe"]["1"].update(mmd=float("nan")), "finite"),
        (lambda m: m["dpo"]["reward_mean"].pop("dpo"), r"reward_mean: missing required key 'dpo'"),
        (lambda m: m.update(models={}), "at least one model"),
    ],
)
def test_schema_rejects_bad_metrics_naming_the_key(mutate, message):
    metrics = copy.deepcopy(_valid_2d_metrics())
    mutate(metrics)
    with pytest.raises(MetricsSchemaError, match=message):
        validate_metrics_schema(metrics)
    assert issubclass(MetricsSchemaError, ValueError)


def test_progress_repeats_the_current_step_while_it_runs_long():
    import time

    from components.evaluation.protocol import Progress

    lines: list[str] = []
    progress = Progress(lines.append, heartbeat=0.3)
    progress("teacher NFE 64: default sampler on 10000 points")
    time.sleep(1.6)
    progress.close()
    beats = [line for line in lines if "still on: teacher NFE 64" in line]
    assert 2 <= len(beats) <= 5, lines
    count = len(lines)
    time.sleep(0.5)
    assert len(lines) == count  # closed: no more lines
