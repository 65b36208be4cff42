"""The evaluate stage through its real entry point (`python -m flows evaluate`) on a tiny model dir.

The model is an MLP with all weights zero: its EDM denoiser is then D(x, t) = c_skip(t) x, the exact denoiser of
Gaussian data N(0, sigma_data^2 I). That gives a closed-form PF-ODE path to check the straightness against, and
the quality numbers are recomputed here independently from the saved model, the same noise seed and the val split.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import yaml

from components.config import DataParams, EvaluateParams
from components.data.shards import read_split, write_shards
from components.data.sources import load_source
from components.errors import DataError
from components.io import write_json
from components.evaluation import validate_metrics_schema
from components.evaluation.protocol import toy_heldout
from components.evaluation.uncertainty import PointMetrics
from components.models.store import build_denoiser, load_denoiser, save_denoiser
from components.tracking.lineage import content_digest, run_record_path
from tests.conftest import commit_all, project_env, run_flows, set_params

SIGMA_DATA = 0.5
T_MAX = 80.0
TINY_EVAL = {"n_samples": 50, "n_sweep": 20, "samplers": ["euler", "heun"], "grids": ["uniform", "edm"],
             "nfe": [1, 2, 4], "straightness_steps": 64}


def tiny_spec() -> dict:
    return {"network": {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 16, "depth": 1, "embed_dim": 8}},
            "schedule": {"name": "edm", "kwargs": {}}, "prediction": "edm", "sigma_data": SIGMA_DATA,
            "data_shape": [2], "num_classes": None, "kind": "points",
            "sampler": {"method": "heun", "grid": "edm", "steps": 8, "guidance": 1.0}}


def write_zero_model(directory, run_id: str = "run-of-the-teacher", manifest: bool = True, weights: bool = True):
    """A saved model whose network outputs 0 (so D = c_skip x), with a manifest and a run record like a stage writes."""
    spec = tiny_spec()
    state = {k: torch.zeros_like(v) for k, v in build_denoiser(spec).state_dict().items()}
    save_denoiser(directory, state, spec)
    if manifest:
        (directory / "manifest.json").write_text(json.dumps({"lineage": {"stage": "teacher"}}))
        record = run_record_path(directory.parents[1], directory.name)
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, {"mlflow_run_id": run_id, "git_commit": "abc", "output_digest": content_digest(directory)})
    if not weights:
        (directory / "model.pt").unlink()


def prepare_inputs(project) -> None:
    """Shards written in-process (faster than the shard stage) and the featurizer stage's 2-D marker."""
    shards = project / "data" / "shards"
    shards.mkdir(parents=True)
    manifest = write_shards(load_source(DataParams(n_samples=600)), shards, val_fraction=0.2, samples_per_shard=100,
                            min_shards=2, seed=0, progress=False)
    write_json(shards / "manifest.json", manifest)
    (project / "models" / "featurizer").mkdir(parents=True)
    (project / "models" / "featurizer" / "not_applicable.json").write_text("{}")


def read_metrics(project) -> dict:
    return json.loads((project / "data" / "evaluate" / "metrics.json").read_text())


def quality_numbers(metrics: dict) -> dict:
    """Everything but timings."""
    return {m: {n: {k: v for k, v in e.items() if k != "sec_per_sample"} for n, e in entry["nfe"].items()}
            for m, entry in metrics["models"].items()} | {"floor": metrics["floor"],
                                                          "straightness": metrics["straightness"]}


def gaussian_flow_frame_straightness(dim: int = 2, grid: int = 200_001) -> float:
    """Closed form for the zero model: x(t) = sqrt(sd^2 + t^2) z with z = 80 noise / sqrt(sd^2 + 80^2).

    In the flow frame (s = t / (1 + t), y = x / (1 + t)) the path is y = g(s) z, g(s) = sqrt(sd^2 (1-s)^2 + s^2),
    from s0 = 80/81 to 0; with tau = 1 - s/s0: S = E|z|^2 int_0^1 (g(0) - g(s0) + s0 g'(s))^2 dtau.
    """
    s0 = T_MAX / (1 + T_MAX)
    tau = np.linspace(0.0, 1.0, grid)
    s = s0 * (1 - tau)
    g = lambda v: np.sqrt(SIGMA_DATA ** 2 * (1 - v) ** 2 + v ** 2)  # noqa: E731
    dg = (-(SIGMA_DATA ** 2) * (1 - s) + s) / g(s)
    integrand = (g(0.0) - g(s0) + s0 * dg) ** 2
    mean_sq_norm = dim * T_MAX ** 2 / (SIGMA_DATA ** 2 + T_MAX ** 2)
    return float(mean_sq_norm * np.trapezoid(integrand, tau))


@pytest.fixture
def evaluated(project):
    prepare_inputs(project)
    write_zero_model(project / "models" / "teacher")
    set_params(project, {"evaluate": {**TINY_EVAL, "models": ["teacher", "not_a_stage"]}})
    commit_all(project, "tiny evaluation")
    r = run_flows(project, "evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    return project, r


def test_evaluate_writes_valid_metrics_report_and_mlflow_run_and_reruns_identically(evaluated):
    project, first = evaluated
    metrics = read_metrics(project)
    validate_metrics_schema(metrics)
    # not_a_stage is listed but has no dir and is not a dvc.yaml dep: skipped with a warning
    assert list(metrics["models"]) == ["teacher"]
    assert "skipping model 'not_a_stage'" in first.stdout + first.stderr
    teacher = metrics["models"]["teacher"]["nfe"]
    assert list(teacher) == ["1", "2", "4"]
    # heun: 1 step = 1 NFE (last step is Euler), 2 steps = 3 NFE: never more than requested
    assert [teacher[k]["nfe_actual"] for k in ("1", "2", "4")] == [1, 1, 3]

    # Independent recomputation: same noise seed, the same fresh held-out draw, the saved model's own sampler.
    metrics_2d = PointMetrics(2)
    reference = metrics_2d.prepare(toy_heldout("checkerboard", 50, 0))
    model = load_denoiser(project / "models" / "teacher")
    noise = torch.randn((50, 2), generator=torch.Generator().manual_seed(EvaluateParams().seed))
    for nfe in (1, 4):
        x = model.sample(noise, nfe=nfe).x
        entry = teacher[str(nfe)]
        assert entry["sw2"] == pytest.approx(metrics_2d.sw2_value(metrics_2d.prepare(x), reference), rel=1e-9)
        assert entry["mmd"] == pytest.approx(metrics_2d.mmd_value(metrics_2d.prepare(x), reference), rel=1e-9)
        assert entry["sw2_ratio"] == pytest.approx(entry["sw2"] / metrics["floor"]["sw2"], rel=1e-12)
        for key in ("sw2", "sw2_ratio", "mmd", "w2", "w2_ratio", "off_support"):
            lo, hi = entry[f"{key}_ci"]
            assert lo <= entry[key] <= hi, key
        assert entry["sec_per_sample"] > 0 and entry["vs_teacher_best"] in ("tie", "better", "worse")
    assert metrics["floor_draws"] == 10 and metrics["floor_sd"]["sw2"] > 0
    # The best sampler at each NFE is the sweep's minimum, scored on the main noise.
    for nfe, best in metrics["models"]["teacher"]["best"].items():
        sweep = metrics["models"]["teacher"]["sweep"][nfe]
        assert best["sampler"] == min(sweep, key=sweep.get)
    assert set(metrics["models"]["teacher"]["sweep"]["4"]) == {"euler/uniform", "euler/edm", "heun/uniform", "heun/edm"}
    assert list(metrics["models"]["teacher"]["sweep"]["1"]) == ["euler/uniform", "heun/uniform"]  # 1 step: one grid

    # Straightness in the flow frame against the closed-form Gaussian path (64 Euler steps: 2% tolerance).
    assert metrics["straightness"]["teacher"] == pytest.approx(gaussian_flow_frame_straightness(), rel=0.02)

    report = project / "data" / "evaluate" / "report"
    for name in ("report.html", "sw2_vs_nfe.png", "w2_vs_nfe.png", "scatter_teacher.png", "trajectories_teacher.png"):
        assert (report / name).stat().st_size > 1000, name
    html = (report / "report.html").read_text()
    assert "run-of-the-teacher" in html and "models/teacher" in html and " tie" in html
    best = metrics["models"]["teacher"]["best"]
    rows = json.loads((report / "plots" / "teacher.json").read_text())
    assert [r["nfe"] for r in rows] == [1, 2, 4] and rows[0]["sw2"] == best["1"]["sw2"]
    headline = json.loads((project / "data" / "evaluate" / "headline.json").read_text())["models"]["teacher"]
    assert headline["nfe4"] == pytest.approx(best["4"]["sw2_ratio"], abs=1e-4)
    assert headline["best_lo"] <= headline["best"] <= headline["best_hi"] and len(headline["nfe1_ci"]) == 2
    # The headline is the stage's DVC metrics file.
    shown = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=project, capture_output=True, text=True,
                           env=project_env())
    assert shown.returncode == 0, shown.stderr
    assert "headline.json" in shown.stdout and '"best_nfe"' in shown.stdout and '"best_hi"' in shown.stdout
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["skipped_models"] == ["not_a_stage"]
    assert manifest["lineage"]["inputs"][-1]["path"] == "models/teacher"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(json.loads((project / "data/evaluate/run.json").read_text())["mlflow_run_id"])
    assert run.data.tags["upstream.teacher.run_id"] == "run-of-the-teacher"
    # quality vs NFE is a series per model (step = NFE): a chart in the MLflow UI
    history = client.get_metric_history(run.info.run_id, "teacher.best.sw2_ratio")
    assert sorted(m.step for m in history) == [1, 2, 4]
    assert {m.step: m.value for m in history} == pytest.approx({n: best[str(n)]["sw2_ratio"] for n in (1, 2, 4)})
    assert {m.step for m in client.get_metric_history(run.info.run_id, "teacher.sw2_hi")} == {1, 2, 4}
    assert run.data.metrics["teacher_best"] == pytest.approx(headline["best"])  # headline under plain names
    assert "report/report.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "tables/results.csv" in {a.path for a in client.list_artifacts(run.info.run_id, "tables")}

    # The Prefect flow run carries the models x NFE table as an artifact.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as prefect_client:  # newest first: this test's run (tests run in sequence)
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluate-quality"])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    assert artifacts and artifacts[0].type == "table"
    table = artifacts[0].data if isinstance(artifacts[0].data, list) else json.loads(artifacts[0].data)
    assert [row["nfe"] for row in table] == [1, 2, 4]
    assert table[2]["sw2"] == pytest.approx(best["4"]["sw2"], rel=1e-5)

    # Same inputs, same numbers (timings aside).
    r = run_flows(project, "evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    assert quality_numbers(read_metrics(project)) == quality_numbers(metrics)


def test_flow_time_grid_is_uniform_in_flow_time_for_edm_and_flow_schedules():
    from components.diffusion.schedules import make_schedule
    from components.evaluation.straightness import flow_time_grid

    times, s = flow_time_grid(make_schedule("flow"), 8)
    assert torch.allclose(times, torch.linspace(1.0, 0.0, 9, dtype=torch.float64), atol=1e-12)  # s = t for flow
    times, s = flow_time_grid(make_schedule("edm"), 8)
    assert torch.allclose(s, torch.linspace(80 / 81, 0.0, 9, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(times / (1 + times), s, atol=1e-9)  # edm: s = t / (1 + t)


def test_model_dir_without_manifest_or_weights_fails_with_one_line(project):
    prepare_inputs(project)
    teacher = project / "models" / "teacher"
    write_zero_model(teacher, manifest=False)
    set_params(project, {"evaluate": TINY_EVAL})
    r = run_flows(project, "evaluate")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {teacher} is not a complete model directory: missing manifest.json"
    write_zero_model(teacher, weights=False)
    r = run_flows(project, "evaluate")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {teacher} is not a complete model directory: missing model.pt"
    assert not (project / "data" / "evaluate" / "metrics.json").exists()
    assert not (project / "mlflow.db").exists(), "a bad input must stop the stage before its MLflow run opens"


def test_declared_model_missing_is_a_clear_error(project):
    prepare_inputs(project)
    write_zero_model(project / "models" / "teacher")
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc["stages"]["evaluate"]["deps"].append("models/reflow")
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    set_params(project, {"evaluate": {**TINY_EVAL, "models": ["teacher", "reflow"]}})
    r = run_flows(project, "evaluate")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: stage 'evaluate' needs models/reflow, which does not exist "
                                                 "(run `dvc repro reflow` first)")


@pytest.mark.parametrize("override, expected", [
    ("evaluate.nfe=[0, 2]", "evaluate.nfe.0 = 0: Input should be greater than or equal to 1"),
    ("evaluate.nfe=[-4]", "evaluate.nfe.0 = -4: Input should be greater than or equal to 1"),
    ("evaluate.n_samples=3", "evaluate.n_samples = 3: Input should be greater than or equal to 10"),
])
def test_bad_evaluate_params_are_rejected_by_the_schema(override, expected):
    from components.config import load_params
    from components.errors import ParamsError
    from tests.conftest import REPO

    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", [override])
    assert str(info.value) == f"params.yaml: {expected}"


def test_missing_inception_file_is_an_error_unless_allowed(tmp_path):
    from components.evaluation.leaderboard import inception_request

    warnings: list[str] = []
    asked = EvaluateParams(inception_weights="weights/pt_inception.pth")
    with pytest.raises(DataError, match=r"^evaluate.inception_weights: file not found: weights/pt_inception.pth "):
        inception_request(asked, tmp_path, "image", warnings.append)
    allowed = EvaluateParams(inception_weights="weights/pt_inception.pth", allow_missing_inception=True)
    assert inception_request(allowed, tmp_path, "image", warnings.append) is None
    assert warnings == ["evaluate.inception_weights: file not found: weights/pt_inception.pth; Inception-FID skipped "
                        "(allow_missing_inception)"]
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "pt_inception.pth").write_bytes(b"x")
    assert inception_request(asked, tmp_path, "image", warnings.append) == tmp_path / "weights" / "pt_inception.pth"
    assert inception_request(asked, tmp_path, "points", warnings.append) is None  # 2-D data: not applicable
