"""The teacher stage through `python -m flows teacher`: it learns (samples beat noise under the evaluation
metric), resumes after a kill, runs on 2 ranks, and rejects bad input with one line."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from components.data.shards import read_split
from components.evaluation.metrics import mmd_rbf, sliced_wasserstein2
from components.models.store import load_denoiser
from tests.conftest import project_env, run_flows, set_params, run_record

TINY = {"steps": 400, "batch_size": 256, "checkpoint_every": 100, "log_every": 50, "plot_samples": 200,
        "warmup_steps": 20, "lr": 0.003}


@pytest.fixture
def sharded(project):
    # eight_gaussians: well-separated modes a tiny teacher learns in a few hundred steps, and that a Gaussian
    # with the data's mean and spread clearly does not match (on the checkerboard it takes thousands).
    set_params(project, {"data": {"n_samples": 3000, "name": "eight_gaussians"},
                         "model": {"mlp": {"width": 64, "depth": 2}}, "teacher": TINY})
    assert run_flows(project, "shard").returncode == 0
    return project


def _metrics(project):
    return json.loads((project / "data/teacher/metrics.json").read_text())


def test_teacher_learns_and_its_samples_beat_noise(taught_template):
    sharded = taught_template  # trained once per session by `python -m flows teacher` (tests/conftest.py)
    out = sharded / "models/teacher"
    assert {"model.pt", "model.json", "manifest.json", "samples.png"} <= {p.name for p in out.iterdir()}
    model = load_denoiser(out)
    val, _ = read_split(sharded / "data/shards", "val")
    val = torch.from_numpy(val)
    g = torch.Generator().manual_seed(1)
    samples = model.sample(torch.randn(len(val), 2, generator=g), steps=16).x
    noise = torch.randn(len(val), 2, generator=g) * val.std(0)  # a Gaussian with the data's spread
    sw_model, sw_noise = sliced_wasserstein2(samples, val), sliced_wasserstein2(noise, val)
    mmd_model, mmd_noise = mmd_rbf(samples, val), mmd_rbf(noise, val)
    assert sw_model < 0.6 * sw_noise, (sw_model, sw_noise)
    assert mmd_model < 0.5 * mmd_noise, (mmd_model, mmd_noise)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{sharded / 'mlflow.db'}")
    run_id = run_record(sharded, "teacher")["mlflow_run_id"]
    losses = [m.value for m in client.get_metric_history(run_id, "loss")]
    assert len(losses) >= 5 and losses[-1] < losses[0]  # the training loss went down
    assert client.get_run(run_id).data.tags["upstream.shard.run_id"]
    assert _metrics(sharded)["steps"] == 400


def _checkpoint_steps(root) -> list[int]:
    return sorted(int(p.name.removeprefix("step")) for p in root.glob("*/step*") if p.is_dir())


def test_killed_teacher_resumes_from_its_last_checkpoint(sharded):
    # Checkpoints every 50 steps, older ones pruned: at ~300 steps/s a given one lives well under a second, so wait
    # for any checkpoint at or past step 100, not for step 100 itself.
    set_params(sharded, {"teacher": {**TINY, "steps": 20000, "checkpoint_every": 50}})
    log = sharded.parent / "killed-teacher.log"  # what the killed run printed, for the failure message
    ckpt_root = sharded / "checkpoints/teacher"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "teacher"], cwd=sharded, env=project_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started, deadline = time.time(), time.time() + 240
        while time.time() < deadline and proc.poll() is None and not [
                s for s in _checkpoint_steps(ckpt_root) if s >= 100]:
            time.sleep(0.2)
        exited_by_itself = proc.poll()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    steps = _checkpoint_steps(ckpt_root)
    assert steps and steps[-1] >= 100 and exited_by_itself is None, (
        f"no checkpoint past step 100 before the kill after {time.time() - started:.0f} s (checkpoints {steps}; "
        f"the stage exited by itself: {exited_by_itself}); its output ended with:\n{log.read_text()[-4000:]}")
    assert not (sharded / "models/teacher").exists()  # a killed stage leaves no half output
    last = steps[-1]
    set_params(sharded, {"teacher": {**TINY, "steps": last + 50, "checkpoint_every": 50}})
    r = run_flows(sharded, "teacher")
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(sharded)
    # the last checkpoint, or the one before it when the kill landed mid-write
    assert m["resumed_from_step"] >= min(100, last) and m["steps"] == last + 50


def test_teacher_on_two_ranks(sharded):
    set_params(sharded, {"teacher": {**TINY, "steps": 20, "batch_size": 128}, "distributed": {"processes_per_node": 2}})
    r = run_flows(sharded, "teacher")
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(sharded)
    assert m["processes"] == 2 and m["steps"] == 20
    assert load_denoiser(sharded / "models/teacher").spec["network"]["kind"] == "mlp"


def test_teacher_without_shards_says_what_to_run(project):
    r = run_flows(project, "teacher")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: stage 'teacher' needs data/shards, which does not exist "
                                                 "(run `dvc repro shard` first)")


@pytest.mark.parametrize("update, message", [
    ({"objective": "score"}, "teacher.objective"),
    ({"batch_size": 100, "grad_accum": 3}, "teacher.batch_size 100 is not divisible by distributed.processes_per_node "
                                           "x distributed.nodes x teacher.grad_accum = 1 x 1 x 3 = 3"),
    ({"sampler": {"method": "heun", "grid": "auto", "steps": 0, "guidance": 1.0}}, "teacher.sampler.steps"),
])
def test_bad_teacher_params_are_one_line(project, update, message):
    set_params(project, {"teacher": update})
    r = run_flows(project, "teacher")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
