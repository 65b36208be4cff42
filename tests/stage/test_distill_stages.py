"""progressive and consistency stages through `python -m flows <stage>` on a tiny eight-gaussians teacher: outputs
load and sample at each kept step count, every PD round is a child MLflow run, the 1-step students beat the
teacher's 1-step samples, and bad input stops with one line."""
import json

import pytest
import torch

from components.config import DataParams
from components.data.shards import read_split
from components.evaluation.metrics import sliced_wasserstein2
from components.models.store import load_denoiser
from tests.conftest import run_flows, set_params, run_record
from tests.stage.test_featurizer_stage import conditional_zero_unet, write_shards_for



@pytest.fixture
def with_teacher(taught_project):
    set_params(taught_project, {
        "progressive": {"teacher_steps": 4, "steps": 150, "checkpoint_every": 50, "log_every": 25},
        "consistency": {"steps": 300, "checkpoint_every": 100, "log_every": 50}})
    return taught_project


def test_students_sample_at_their_step_counts_and_beat_the_teacher_at_one_step(with_teacher):
    root = with_teacher
    for stage in ("progressive", "consistency"):
        r = run_flows(root, stage)
        assert r.returncode == 0, r.stderr[-3000:]
    val = torch.from_numpy(read_split(root / "data/shards", "val")[0])
    noise = torch.randn(len(val), 2, generator=torch.Generator().manual_seed(0))
    teacher = load_denoiser(root / "models/teacher")
    sw_teacher_1 = sliced_wasserstein2(teacher.sample(noise, nfe=1).x, val)

    progressive = load_denoiser(root / "models/progressive")
    assert progressive.spec["students"] == {"2": "steps_2", "1": "steps_1"}
    for nfe, expected in ((1, 1), (2, 2), (8, 2)):  # the student with the most steps that fit
        assert progressive.sample(noise, nfe=nfe).nfe == expected
    sw_pd_1 = sliced_wasserstein2(progressive.sample(noise, nfe=1).x, val)

    consistency = load_denoiser(root / "models/consistency")
    assert [consistency.sample(noise, nfe=k, generator=torch.Generator().manual_seed(1)).nfe for k in (1, 2, 4)] == [1, 2, 4]
    sw_cd_1 = sliced_wasserstein2(consistency.sample(noise, nfe=1).x, val)
    assert sw_pd_1 < 0.8 * sw_teacher_1, (sw_pd_1, sw_teacher_1)
    assert sw_cd_1 < 0.8 * sw_teacher_1, (sw_cd_1, sw_teacher_1)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    record = run_record(root, "progressive")
    run_ids = record["round_run_ids"]
    assert set(run_ids) == {"round_2", "round_1"}
    stage_run = record["mlflow_run_id"]
    for run_id in run_ids.values():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == stage_run and run.info.status == "FINISHED"
        assert client.get_metric_history(run_id, "loss")

    # A rerun finds every round's final checkpoint: nothing is retrained.
    r = run_flows(root, "progressive")
    assert r.returncode == 0, r.stderr[-3000:]
    rounds = json.loads((root / "data/progressive/metrics.json").read_text())["rounds"]
    assert all(r["resumed_from_step"] == 150 for r in rounds.values())


def test_bad_input_stops_with_one_line(project):
    set_params(project, {"progressive": {"teacher_steps": 12}})
    r = run_flows(project, "progressive")
    assert r.returncode != 0 and "progressive.teacher_steps" in r.stderr and "power of two" in r.stderr
    set_params(project, {"progressive": {"teacher_steps": 8}})
    r = run_flows(project, "consistency")  # no shards, no teacher
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_progressive_distils_a_guided_conditional_teacher_into_unguided_students(project):
    """A conditional teacher sampled with guidance w = 2: round 1 learns the guided teacher's steps, so the students
    record the teacher's guidance and sample unguided (guiding them again would apply it twice)."""
    write_shards_for(project, DataParams(source="digits"))
    conditional_zero_unet(project / "models/teacher", guidance=2.0)
    set_params(project, {"progressive": {"teacher_steps": 2, "steps": 3, "batch_size": 8, "checkpoint_every": 0,
                                         "log_every": 1}})
    r = run_flows(project, "progressive")
    assert r.returncode == 0, r.stderr[-3000:]
    student = load_denoiser(project / "models/progressive")
    assert student.spec["sampler"]["guidance"] == 1.0
    assert student.spec["distilled_from"]["teacher_guidance"] == 2.0
    cond = torch.arange(4)
    assert student.sample(torch.randn(4, 1, 8, 8), nfe=1, cond=cond).nfe == 1  # one unguided call
