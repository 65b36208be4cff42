"""preferences + dpo stages through `python -m flows`: pairs respect the margin and carry lineage, DPO raises the
reward win rate over the reference on held-out seeds (a real check), and bad input stops with one line."""
import json

import torch

from components.data.shards import read_split
from components.models.store import load_denoiser
from components.preferences.alignment import evaluate_alignment
from components.preferences.pairs import read_pair_shards
from components.preferences.rewards import make_reward
from tests.conftest import run_flows, set_params, run_record

MODE0_BOX = [[1.5, -0.6, 2.6, 0.6]]  # eight_gaussians: the mode at angle 0, centred on (2, 0)
PREFS = {"reward": {"kind": "region", "squares": [], "boxes": MODE0_BOX}, "groups": 4, "k": 128,
         "min_margin": 0.05}
DPO = {"steps": 80, "batch_size": 64, "lr": 0.0005, "beta": 1000.0, "checkpoint_every": 40, "log_every": 20,
       "warmup_steps": 5}


def test_preferences_then_dpo_raise_the_win_rate_on_held_out_seeds(taught_project):
    project = taught_project
    set_params(project, {"preferences": PREFS, "dpo": DPO})
    for stage in ("preferences",):
        r = run_flows(project, stage)
        assert r.returncode == 0, (stage, r.stderr[-3000:])
    pairs, manifest = read_pair_shards(project / "data/pairs")
    assert len(pairs) >= 100 and bool(((pairs.score_w - pairs.score_l) >= 0.05).all())
    teacher_run = run_record(project, "teacher")["mlflow_run_id"]
    assert run_record(project, "preferences")["generating_run_id"] == teacher_run
    assert manifest["reward"]["boxes"] == MODE0_BOX

    r = run_flows(project, "dpo")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((project / "data/dpo/metrics.json").read_text())
    assert metrics["steps"] == 80 and metrics["implicit_accuracy_heldout"] > 0.5
    reference, tuned = load_denoiser(project / "models/teacher"), load_denoiser(project / "models/dpo")
    val_x, val_y = read_split(project / "data/shards", "val")
    block = evaluate_alignment(reference, tuned, make_reward(manifest["reward"]), n=500, seed=123,
                               real_x=torch.from_numpy(val_x), real_y=torch.from_numpy(val_y))
    assert block["win_rate"] > 0.5, block
    assert block["reward_mean"]["dpo"] > block["reward_mean"]["reference"], block

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run_id = run_record(project, "dpo")["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["upstream.preferences.run_id"] and "implicit_accuracy" in run.data.metrics

    # bad input: beta <= 0 stops before anything is written, naming the key
    set_params(project, {"dpo": {**DPO, "beta": 0.0}})
    r = run_flows(project, "dpo")
    assert r.returncode != 0 and "dpo.beta" in r.stderr + r.stdout
