"""The couplings and reflow stages through `python -m flows`: the couplings are the teacher's ODE solutions with
their lineage, reflow straightens the paths and beats the teacher at one step, each round is a nested MLflow run,
and bad input (wrong teacher, count < batch size, too few NFE) stops or warns with one line."""
import json

import mlflow
import pytest
import torch

from components.data.shards import read_split
from components.evaluation.metrics import sliced_wasserstein2
from components.io import file_records
from components.models.store import WEIGHTS_FILE, load_denoiser
from components.training.reflow_training import chunk_noise, read_couplings
from components.tracking.stage import FILES_KEY
from tests.conftest import run_flows, set_params, run_record

COUPLINGS = {"count": 2000, "batch_size": 500, "nfe": 32, "samples_per_shard": 800}
REFLOW = {"steps": 300, "batch_size": 256, "checkpoint_every": 150, "warmup_steps": 20, "lr": 0.002,
          "distill_nfe": 0}


@pytest.fixture
def taught(taught_project):
    set_params(taught_project, {"couplings": COUPLINGS, "reflow": REFLOW})
    return taught_project


def _json(path):
    return json.loads(path.read_text())


def test_couplings_then_reflow_straighten_paths_and_beat_the_teacher_at_one_step(taught):
    r = run_flows(taught, "couplings")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = _json(taught / "data/couplings/shards/manifest.json")
    teacher_run = run_record(taught, "teacher")["mlflow_run_id"]
    assert manifest["count"] == 2000 and manifest["nfe"] == 32 and manifest["solver"] == "heun"
    assert run_record(taught, "couplings")["upstream"]["teacher"] == teacher_run
    z, x, y = read_couplings(taught / "data/couplings/shards")
    assert z.shape == x.shape == (2000, 2) and y is None
    # The pairs are the teacher's ODE solutions of the recorded fixed-seed noise.
    teacher = load_denoiser(taught / "models/teacher")
    z0, _ = chunk_noise(0, 0, 500, [2], None)
    assert torch.equal(z[:500], z0)
    assert torch.allclose(x[:64], teacher.sample(z0[:64], nfe=32, method="heun", grid="uniform").x, atol=1e-5)

    r = run_flows(taught, "reflow")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = _json(taught / "data/reflow/metrics.json")
    assert metrics["straightness"] < 0.5 * metrics["teacher_straightness"], metrics
    reflow = load_denoiser(taught / "models/reflow")
    assert reflow.spec["sampler"]["method"] == "euler"
    val = torch.from_numpy(read_split(taught / "data/shards", "val")[0])
    noise = torch.randn(len(val), 2, generator=torch.Generator().manual_seed(5))
    sw_reflow = sliced_wasserstein2(reflow.sample(noise, nfe=1).x, val)
    sw_teacher = sliced_wasserstein2(teacher.sample(noise, nfe=1).x, val)
    assert sw_reflow < 0.7 * sw_teacher, (sw_reflow, sw_teacher)
    assert metrics["round1_coupling_cost_over_assignment"] >= 1 - 1e-6  # the assignment is a lower bound

    # The round is an MLflow child run nested under the stage's run.
    stage_run = run_record(taught, "reflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{taught / 'mlflow.db'}")
    child = client.get_run(stage_run["rounds"][0]["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == stage_run["mlflow_run_id"]
    assert [m.value for m in client.get_metric_history(child.info.run_id, "loss")]

    # A different teacher than the one recorded in the couplings' manifest: refused with one line.
    state = torch.load(taught / "models/teacher" / WEIGHTS_FILE, weights_only=True)
    torch.save({k: v + 0.01 for k, v in state.items()}, taught / "models/teacher" / WEIGHTS_FILE)
    manifest = _json(taught / "models/teacher/manifest.json")  # a complete other teacher, files recorded as such
    manifest[FILES_KEY] = file_records(taught / "models/teacher")
    (taught / "models/teacher/manifest.json").write_text(json.dumps(manifest))
    r = run_flows(taught, "reflow")
    assert r.returncode != 0 and "generated from a different teacher" in r.stderr + r.stdout
    assert "rerun `dvc repro couplings`" in r.stderr + r.stdout
    # One teacher serves both tests' worth of checks (training it is the slow part).
    _bad_input_rounds_and_distillation(taught)


def _bad_input_rounds_and_distillation(taught):
    """couplings: count < batch size is a params error, too few NFE warns; reflow: count < batch size is refused,
    k = 2 rounds + two-step distillation are nested child runs."""
    before = (taught / "data/couplings/shards/manifest.json").read_text()
    set_params(taught, {"couplings": {**COUPLINGS, "count": 100, "batch_size": 500}})
    r = run_flows(taught, "couplings")
    assert r.returncode != 0 and "couplings" in r.stderr and "smaller than batch_size" in r.stderr
    assert (taught / "data/couplings/shards/manifest.json").read_text() == before  # nothing written
    set_params(taught, {"couplings": {**COUPLINGS, "count": 500, "nfe": 1, "max_error": 1e-4}})
    r = run_flows(taught, "couplings")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "couplings.nfe=1 is too small" in r.stderr + r.stdout
    assert _json(taught / "data/couplings/metrics.json")["relative_error"] > 1e-4

    # reflow: fewer pairs than one batch is refused; k = 2 rounds + two-step distillation are nested child runs.
    set_params(taught, {"reflow": {**REFLOW, "batch_size": 1024}})
    r = run_flows(taught, "reflow")
    assert r.returncode != 0 and "fewer than reflow.batch_size=1024" in r.stderr
    set_params(taught, {"reflow": {**REFLOW, "steps": 30, "checkpoint_every": 0, "rounds": 2,
                                   "distill_nfe": 2, "distill_steps": 30}})
    r = run_flows(taught, "reflow")
    assert r.returncode == 0, r.stderr[-3000:]
    record = run_record(taught, "reflow")
    stage_run = record["mlflow_run_id"]
    children = [entry["mlflow_run_id"] for entry in record["rounds"]] + [record["distill"]["mlflow_run_id"]]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{taught / 'mlflow.db'}")
    assert len(set(children)) == 3
    assert all(client.get_run(c).data.tags["mlflow.parentRunId"] == stage_run for c in children)
    distilled = load_denoiser(taught / "models/reflow")
    assert distilled.spec["sampler"]["steps"] == 2 and distilled.spec["objective"] == "reflow_distill"
    assert _json(taught / "data/reflow/metrics.json")["distill_nfe"] == 2
    assert load_denoiser(taught / "models/reflow/rectified").spec["objective"] == "reflow"
