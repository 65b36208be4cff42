"""The Trainer over ranks and across failures: 2 ranks x B/2 follow 1 rank x B; a checkpoint resumes with another
number of ranks (ZeRO 0) or says what to do (ZeRO 1/2); an unreadable newest checkpoint falls back to the previous
one; loading never unpickles arbitrary objects; `steps` below the checkpoint's step is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.training import CheckpointMismatchError, TrainConfig, Trainer, launch_ranks
from tests.unit import _dist_worker

WORKER = Path(_dist_worker.__file__)


def _launch(n: int, out: Path, checkpoint_dir: Path, steps: int, zero_stage: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    assert launch_ranks(n, [str(WORKER), str(out), str(checkpoint_dir), str(steps), str(zero_stage)]) == 0
    return json.loads((out / "result.json").read_text())


def test_two_ranks_with_half_batches_follow_one_rank_and_resume_on_one(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    _dist_worker.main(tmp_path / "one", tmp_path / "ck1", 200, 0)  # one rank, in this process
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = _launch(2, tmp_path / "two", tmp_path / "ck2", 200)
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["steps"] == two["steps"] == 200
    losses_one, losses_two = np.array(one["losses"]), np.array(two["losses"])
    assert losses_one[-1] < 0.8 * losses_one[0]  # it learns
    # Tolerance: float rounding of two half-batch gradient means vs one full-batch mean (measured over 300 steps: 6e-8 / 2.4e-7).
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
    np.testing.assert_allclose(two["params"], one["params"], atol=1e-5)

    # ZeRO 0 keeps the whole optimizer state on rank 0: the 2-rank checkpoint continues on 1 rank.
    (tmp_path / "resumed").mkdir()
    _dist_worker.main(tmp_path / "resumed", tmp_path / "ck2", 220, 0)
    resumed = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert resumed["world_size"] == 1 and resumed["steps"] == 220 and len(resumed["losses"]) == 2


def test_zero_checkpoint_from_two_ranks_on_one_says_what_to_do(tmp_path: Path) -> None:
    _launch(2, tmp_path / "two", tmp_path / "ck", 10, zero_stage=1)
    (tmp_path / "one").mkdir()
    _dist_worker.main(tmp_path / "one", tmp_path / "ck", 20, 1)
    message = (tmp_path / "one" / "error.txt").read_text()
    assert "written by 2 ranks with ZeRO stage 1" in message and "this run has 1" in message
    assert "distributed.processes_per_node x distributed.nodes = 2" in message and "\n" not in message


def _tiny_trainer(checkpoint_dir: Path, steps: int) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-2, checkpoint_every=2, keep_checkpoints=2,
                         progress_bar=False)
    return Trainer(nn.Linear(3, 1), lambda engine, batch: ((engine(batch["x"]) - 1.0) ** 2).mean() * 1.0 and
                   (((engine(batch["x"]) - 1.0) ** 2).mean(), {}), config, checkpoint_dir)


def _batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield {"x": torch.randn(8, 3, generator=generator)}


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, capfd) -> None:
    ck = tmp_path / "ck"
    _tiny_trainer(ck, 4).fit(_batches())
    assert sorted(p.name for p in ck.glob("step*")) == ["step00000002", "step00000004"]
    bad = ck / "step00000004" / "mp_rank_00_model_states.pt"
    bad.write_bytes(b"garbage, not a checkpoint" * 10)
    trainer = _tiny_trainer(ck, 6)
    assert trainer._resume() and trainer.step == 2  # the step-2 checkpoint, after one warning naming the file
    err = capfd.readouterr().err
    assert f"warning: checkpoint {ck / 'step00000004'} is unreadable ({bad}:" in err
    assert trainer.fit(_batches()).steps == 6


def test_checkpoint_loading_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _tiny_trainer(ck, 2).fit(_batches())
    marker = tmp_path / "pwned"
    state = torch.load(ck / "step00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    state["payload"] = _Exploit(str(marker))
    torch.save(state, ck / "step00000002" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointMismatchError, match="no checkpoint in .* is readable"):
        _tiny_trainer(ck, 4).fit(_batches())
    assert not marker.exists()


class _Exploit:
    """Unpickling this runs `open(path, "w")`: what a hostile checkpoint file would do with weights_only=False."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_one_process_opens_no_listener_outside_loopback(tmp_path: Path) -> None:
    import psutil

    _tiny_trainer(tmp_path / "ck", 2).fit(_batches())
    listening = {c.laddr for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    # No rendezvous store at all (in-process HashStore); gloo's own socket is bound to the loopback interface.
    assert all(address.ip in ("127.0.0.1", "::1") for address in listening), listening


def test_steps_below_the_checkpoint_step_is_a_one_line_error(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _tiny_trainer(ck, 4).fit(_batches())
    with pytest.raises(CheckpointMismatchError) as e:
        _tiny_trainer(ck, 3).fit(_batches())
    assert str(e.value) == (f"checkpoint {ck / 'step00000004'} is at step 4 but steps is 3: set steps >= 4 to "
                            f"continue it, or delete {ck} to train 3 steps from scratch")
    shutil.rmtree(ck)


def test_node_rank_and_rendezvous_come_from_the_environment(monkeypatch) -> None:
    from components.errors import UserError
    from components.training.distributed import (interface_towards, launcher_command, loopback_interface,
                                                 node_rank, rendezvous_endpoint)

    for var in ("NODE_RANK", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert node_rank(1) == 0 and rendezvous_endpoint(1)[0] == "127.0.0.1"
    with pytest.raises(UserError, match="needs this machine's node rank in NODE_RANK"):
        node_rank(2)
    with pytest.raises(UserError, match="needs the rendezvous endpoint in MASTER_ADDR and MASTER_PORT"):
        rendezvous_endpoint(2)
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert node_rank(2) == 1
    monkeypatch.setenv("NODE_RANK", "2")  # NODE_RANK wins over Slurm's variable, and must be < nodes
    with pytest.raises(UserError, match="NODE_RANK=2 is not a node rank in 0..1"):
        node_rank(2)
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    command = launcher_command(4, ["-m", "components.training.worker", "job.json"], nodes=2)
    assert command[command.index("--nnodes") + 1] == "2" and command[command.index("--node_rank") + 1] == "0"
    assert command[command.index("--master_port") + 1] == "29555"
    assert interface_towards("127.0.0.1") == loopback_interface()
