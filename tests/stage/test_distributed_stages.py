"""Training stages on several processes and "nodes" through the one launcher (torchrun, gloo on CPU): two nodes of
one rank each meet at a rendezvous on 127.0.0.1 and train the teacher to completion; nothing listens outside
127.0.0.1; kill -9 of one rank stops the whole job within a bounded time and the rerun resumes."""
import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from components.io import free_port
from tests.conftest import project_env, run_flows, run_record, set_params

TINY = {"steps": 4000, "batch_size": 128, "checkpoint_every": 20, "log_every": 10, "plot_samples": 100,
        "warmup_steps": 5, "lr": 0.003}


@pytest.fixture
def sharded(project):
    set_params(project, {"model": {"mlp": {"width": 32, "depth": 2}}, "teacher": TINY})
    assert run_flows(project, "shard").returncode == 0
    return project


def _tree(*procs: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            out += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def _listening_addresses(processes: list[psutil.Process]) -> set[str]:
    addresses = set()
    for p in processes:
        try:
            addresses |= {c.laddr.ip for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return addresses


def _wait(procs, timeout: float, listeners: set[str]) -> None:
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        listeners |= _listening_addresses(_tree(*procs))
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _metrics(project):
    return json.loads((project / "data/teacher/metrics.json").read_text())


def test_two_nodes_meet_at_a_loopback_rendezvous_and_train_the_teacher(sharded):
    set_params(sharded, {"teacher": {**TINY, "steps": 30}, "distributed": {"nodes": 2, "processes_per_node": 1}})
    port = str(free_port())
    node0 = subprocess.Popen([sys.executable, "-m", "flows", "teacher"], cwd=sharded, stderr=subprocess.PIPE, text=True,
                             env=project_env(NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    node1 = subprocess.Popen([sys.executable, "-m", "flows.join"], cwd=sharded, stderr=subprocess.PIPE, text=True,
                             env=project_env(NODE_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    listeners: set[str] = set()
    _wait([node0, node1], 400, listeners)
    assert node0.returncode == 0, node0.stderr.read()[-3000:]
    assert node1.returncode == 0, node1.stderr.read()[-3000:]
    m = _metrics(sharded)
    assert m["processes"] == 2 and m["steps"] == 30
    assert run_record(sharded, "teacher")["mlflow_run_id"] and (sharded / "models/teacher/model.pt").is_file()
    assert listeners and listeners <= {"127.0.0.1", "::1"}, listeners


def test_killing_one_rank_stops_the_job_and_the_rerun_resumes(sharded):
    set_params(sharded, {"distributed": {"processes_per_node": 2}})
    stage = subprocess.Popen([sys.executable, "-m", "flows", "teacher"], cwd=sharded, env=project_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpt_root = sharded / "checkpoints/teacher"
    deadline = time.time() + 300
    # any complete checkpoint: older ones are pruned as newer ones land, so a fast machine never shows step 20 long
    while time.time() < deadline and not list(ckpt_root.glob("*/step*/trainer_state.json")):
        assert stage.poll() is None, f"the stage exited ({stage.returncode}) before a checkpoint: {stage.stderr.read()[-3000:]}"
        time.sleep(0.2)
    assert list(ckpt_root.glob("*/step*/trainer_state.json")), "no checkpoint appeared"
    ranks = [p for p in _tree(stage) if "components.training.worker" in (cmd := " ".join(p.cmdline()))
             and "components.training.launcher" not in cmd]  # the ranks, not torchrun's agent
    assert len(ranks) == 2
    listeners = _listening_addresses(_tree(stage))
    killed_at = time.time()
    ranks[1].send_signal(signal.SIGKILL)
    _wait([stage], 120, listeners)
    stopped_after = time.time() - killed_at
    assert stage.returncode not in (0, None) and stopped_after < 60, (stage.returncode, stopped_after)
    assert not [p for p in _tree(stage) if p.is_running()]  # no rank left behind
    assert listeners <= {"127.0.0.1", "::1"}, listeners

    # a loaded machine may have checkpointed well past step 20 before the kill: finish 40 steps after the newest
    reached = max(int(d.name[4:]) for d in ckpt_root.glob("*/step*") if d.is_dir() and d.name[4:].isdigit())
    set_params(sharded, {"teacher": {**TINY, "steps": reached + 40}})
    r = run_flows(sharded, "teacher")
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(sharded)
    assert m["resumed_from_step"] >= 20 and m["steps"] == reached + 40 and m["processes"] == 2


def _ranks_seen(proc: subprocess.Popen, timeout: float) -> int:
    """Most training ranks (launched worker processes, not torchrun's agent) seen at once while `proc` runs."""
    most, deadline = 0, time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        ranks = []
        for p in _tree(proc):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.NoSuchProcess:
                continue
            if "worker" in cmd and "components.training.launcher" not in cmd:
                ranks.append(p)
        most = max(most, len(ranks))
        time.sleep(0.3)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return most


DPO_PAIRS = {"reward": {"kind": "region", "squares": [], "boxes": [[1.5, -0.6, 2.6, 0.6]]}, "groups": 4, "k": 64,
             "min_margin": 0.05}


def stage_on_ranks(project, stage: str) -> int:
    """Run `python -m flows <stage>` (params set to 2 ranks by the caller); it must succeed. Returns the most ranks
    seen at once."""
    proc = subprocess.Popen([sys.executable, "-m", "flows", stage], cwd=project, env=project_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ranks = _ranks_seen(proc, 600)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return ranks


@pytest.mark.parametrize("stage, params", [
    ("progressive", {"teacher_steps": 2, "steps": 10, "batch_size": 64, "checkpoint_every": 0, "log_every": 5}),
    ("consistency", {"steps": 10, "batch_size": 64, "checkpoint_every": 0, "log_every": 5}),
])
def test_student_stage_on_two_ranks_writes_a_model_with_lineage(taught_project, stage, params):
    """Every training stage on 2 launched ranks (reflow and dpo: in the couplings and user-error tests below)."""
    from components.models.store import load_denoiser

    set_params(taught_project, {stage: params, "distributed": {"processes_per_node": 2}})
    assert stage_on_ranks(taught_project, stage) == 2
    assert load_denoiser(taught_project / f"models/{stage}") is not None
    assert run_record(taught_project, stage)["mlflow_run_id"]


def test_couplings_on_two_ranks_write_the_same_shards_as_one_process(taught_project):
    """Issue 15: the couplings solve split over 2 launched ranks (chunks by index) merges into byte-identical
    shards to one process's, given the seeds; reflow then trains on them on 2 ranks."""
    import hashlib

    from components.models.store import load_denoiser

    def shard_digests() -> dict[str, str]:
        out = taught_project / "data/couplings/shards"
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}

    tiny = {"count": 96, "batch_size": 16, "nfe": 4, "error_samples": 16, "samples_per_shard": 48,
            "samples_per_record": 16, "max_error": 10.0}
    set_params(taught_project, {"couplings": tiny})
    r = run_flows(taught_project, "couplings")
    assert r.returncode == 0, r.stderr[-3000:]
    one = shard_digests()
    assert len(one) == 2

    set_params(taught_project, {"distributed": {"processes_per_node": 2}})
    assert stage_on_ranks(taught_project, "couplings") == 2
    assert shard_digests() == one
    assert json.loads((taught_project / "data/couplings/metrics.json").read_text())["processes"] == 2

    # reflow on those couplings, on the same 2 ranks
    set_params(taught_project, {"reflow": {"steps": 10, "batch_size": 32, "checkpoint_every": 0, "log_every": 5,
                                           "warmup_steps": 2, "distill_nfe": 0}})
    assert stage_on_ranks(taught_project, "reflow") == 2
    assert load_denoiser(taught_project / "models/reflow") is not None
    assert run_record(taught_project, "reflow")["upstream"]["couplings"] == \
        run_record(taught_project, "couplings")["mlflow_run_id"]


def test_dpo_on_two_ranks_and_a_user_error_on_a_rank_is_one_line(taught_project):
    """A bad setting found inside the launched ranks (more batch than pairs) stops the stage with the rank's one-line
    message and exit 2, as one process would, not a traceback and "ranks exited with code 1"; with a batch that
    fits, dpo trains on the 2 ranks and writes its model with lineage."""
    from components.models.store import load_denoiser

    set_params(taught_project, {"preferences": DPO_PAIRS})
    assert run_flows(taught_project, "preferences").returncode == 0
    dpo = {"steps": 10, "batch_size": 4096, "checkpoint_every": 0, "log_every": 5, "warmup_steps": 2}
    set_params(taught_project, {"dpo": dpo, "distributed": {"processes_per_node": 2}})
    r = run_flows(taught_project, "dpo")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = [line for line in r.stderr.splitlines() if line.startswith("error: ")][-1]
    assert last.startswith("error: dpo.batch_size=4096 is more than the ") and "training pairs" in last

    set_params(taught_project, {"dpo": {**dpo, "batch_size": 32}})
    assert stage_on_ranks(taught_project, "dpo") == 2
    assert load_denoiser(taught_project / "models/dpo") is not None
    assert run_record(taught_project, "dpo")["upstream"]["preferences"] == \
        run_record(taught_project, "preferences")["mlflow_run_id"]


def test_evaluate_on_two_ranks_gives_the_one_process_numbers(taught_project):
    """Issue 15: the evaluate stage scores its models on 2 launched ranks (each rank every other model) and merges
    them into the same metrics.json as one process (timings aside)."""
    import shutil

    def numbers(value):  # metrics.json without its timings
        if isinstance(value, dict):
            return {k: numbers(v) for k, v in value.items() if "sec" not in k}
        return [numbers(v) for v in value] if isinstance(value, list) else value

    shutil.copytree(taught_project / "models/teacher", taught_project / "models/twin")  # a second model to split
    set_params(taught_project, {"evaluate": {"models": ["teacher", "twin"], "nfe": [1, 2], "n_samples": 400,
                                             "n_sweep": 64, "samplers": ["euler", "heun"], "grids": ["uniform"],
                                             "straightness_samples": 64, "straightness_steps": 4}})
    for stage in ("featurizer", "evaluate"):  # featurizer: a marker on 2-D data, evaluate's declared input
        r = run_flows(taught_project, stage)
        assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((taught_project / "data/evaluate/metrics.json").read_text())
    assert set(one["models"]) == {"teacher", "twin"}

    set_params(taught_project, {"distributed": {"processes_per_node": 2}})
    assert stage_on_ranks(taught_project, "evaluate") == 2
    two = json.loads((taught_project / "data/evaluate/metrics.json").read_text())
    assert numbers(two) == numbers(one)
