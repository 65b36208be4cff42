"""The one training recipe: a JSON-able TrainJob runs, exports, resumes; checkpoint dirs ignore resumable settings;
training errors are user errors by type."""
import dataclasses
import json

import pytest
import torch

from components.config import TrainConfig
from components.errors import UserError
from components.models.store import build_denoiser, model_from_weights
from components.training.recipe import TrainJob, checkpoint_dir, run_job, task_ref
from components.training.reflow_training import coupling_task, write_coupling_shards
from components.training.trainer import CheckpointMismatchError, NonFiniteLossError

SPEC = {"network": {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 16, "depth": 1, "embed_dim": 8,
                                              "dropout": 0.0, "num_classes": None}},
        "schedule": {"name": "flow", "kwargs": {}}, "prediction": "v", "sigma_data": 1.0, "data_shape": [2],
        "num_classes": None, "kind": "points", "objective": "reflow",
        "sampler": {"method": "euler", "grid": "uniform", "steps": 1, "guidance": 1.0}}


def test_checkpoint_dir_ignores_only_resumable_settings(tmp_path):
    base = checkpoint_dir(tmp_path, TrainConfig(steps=10), "model")
    assert base == checkpoint_dir(tmp_path, TrainConfig(steps=20, log_every=3, checkpoint_every=5), "model")
    assert base != checkpoint_dir(tmp_path, TrainConfig(steps=10, lr=0.5), "model")
    assert base != checkpoint_dir(tmp_path, TrainConfig(steps=10), "another model")


def test_training_errors_are_user_errors():
    assert issubclass(CheckpointMismatchError, UserError) and issubclass(NonFiniteLossError, UserError)


def test_a_job_read_back_from_json_trains_exports_and_resumes(tmp_path):
    torch.manual_seed(0)
    z = torch.randn(64, 2)
    couplings = tmp_path / "couplings"
    couplings.mkdir()
    write_coupling_shards(couplings, z, z @ torch.tensor([[0.0, -1.0], [1.0, 0.0]]), None, samples_per_shard=40,
                          samples_per_record=16)
    init = tmp_path / "init.pt"
    torch.save(build_denoiser(SPEC).state_dict(), init)
    job = TrainJob(task_ref(coupling_task), {"spec": SPEC, "init": str(init), "couplings": str(couplings),
                                "objective": {"name": "reflow", "p_uncond": 0.0, "num_classes": None}},
                   TrainConfig(steps=4, batch_size=16, progress_bar=False).model_dump(mode="json"),
                   str(tmp_path / "ckpt"), str(tmp_path / "export.pt"))
    job = TrainJob(**json.loads(json.dumps(dataclasses.asdict(job))))  # what a launched rank reads
    outcome = run_job(job)
    assert outcome.steps == 4 and outcome.resumed_from == 0 and torch.isfinite(torch.tensor(outcome.final_loss))
    first = model_from_weights(SPEC, job.export)
    assert any(not torch.equal(a, b) for a, b in zip(first.denoiser.state_dict().values(),
                                                     torch.load(init, weights_only=True).values()))
    more = dataclasses.replace(job, train={**job.train, "steps": 6})  # same checkpoint dir: resumes
    assert run_job(more).resumed_from == 4
    with pytest.raises(ValueError, match="unknown job function"):
        run_job(dataclasses.replace(job, task="components.training.recipe:nonsense"))
