"""Profiles (profiles/<name>.yaml): param overrides applied through DVC by `python -m flows.profile`.

- every profile validates against the params schema, names a section for every stage in dvc.yaml, and the
  flattened overrides reproduce the profile's values exactly once validated;
- a typo in a profile stops `--check` with one line naming the key;
- the CIFAR-10 profile runs end to end on CPU on a synthetic CIFAR-10-format archive (~140 images): the real
  pipeline flow (real DVC, Prefect, MLflow) reproduces shard + teacher + featurizer with the profile's overrides,
  then evaluate scores the teacher; an image size that does not fit the UNet is one error line naming both sizes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import Params, load_params, read_params_file
from components.profiles import flatten_profile, profile_overrides
from scripts.gpu_check import write_synthetic_cifar10
from tests.conftest import REPO, commit_all, project_env, run_cmd, run_flows, set_params

PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


def dvc_stage_sections() -> set[str]:
    """Stages in dvc.yaml that have a params section of their own."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name for name in stages if name in Params.model_fields}


def attribute(params: Params, dotted: str):
    node = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_validates_covers_every_stage_and_round_trips(path):
    profile = read_params_file(path)
    missing = dvc_stage_sections() - set(profile)
    assert not missing, f"{path.name} has no section for stage(s) {sorted(missing)}"
    params = load_params(REPO / "params.yaml", profile_overrides(profile), source=path.name)
    for key, value in flatten_profile(profile).items():  # every leaf lands where the profile put it
        got = attribute(params, key)
        got = list(got) if isinstance(got, tuple) else got
        assert got == value, key
    assert params.teacher.conditional and params.model.kind == "unet"
    assert params.preferences.reward.kind == "classifier"  # reward: log p(conditioning class)
    assert params.evaluate.models == ["teacher", "reflow", "progressive", "consistency", "dpo"]


def test_profiles_target_their_data():
    digits = load_params(REPO / "params.yaml", profile_overrides(read_params_file(REPO / "profiles/digits.yaml")))
    cifar = load_params(REPO / "params.yaml", profile_overrides(read_params_file(REPO / "profiles/cifar10.yaml")))
    assert digits.data.source == "digits" and digits.teacher.sampler.guidance > 1.0
    assert cifar.data.source == "cifar10" and cifar.teacher.precision == "auto"
    for params, size in ((digits, 8), (cifar, 32)):  # the UNet halves the resolution len(channel_mult) - 1 times
        assert size % 2 ** (len(params.model.unet.channel_mult) - 1) == 0
        assert set(params.model.unet.attention_resolutions) <= {size // 2 ** i for i in range(len(params.model.unet.channel_mult))}


def test_extra_set_wins_over_the_profile_and_a_typo_is_one_line(tmp_path):
    overrides = profile_overrides({"teacher": {"steps": 10}}, ["teacher.steps=7"])
    assert overrides == ["teacher.steps=7"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  stepz: 10\n")
    r = subprocess.run([sys.executable, "-m", "flows.profile", str(bad), "--check"], cwd=REPO,
                       env=project_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: profile bad.yaml: unknown key 'teacher.stepz'"]


TINY_CPU = ["data.max_samples=120", "shard.samples_per_shard=20", "shard.min_shards=2",
            "model.unet.base_channels=8", "model.unet.num_res_blocks=1",
            "teacher.steps=3", "teacher.batch_size=8", "teacher.warmup_steps=0", "teacher.checkpoint_every=0",
            "teacher.log_every=1", "teacher.plot_samples=4", "teacher.sampler.steps=2",
            "featurizer.steps=5", "featurizer.batch_size=16",
            "evaluate.models=[teacher]", "evaluate.nfe=[1, 2]", "evaluate.n_samples=10",
            "evaluate.straightness_steps=2", "evaluate.image_grid_size=4"]


def test_cifar10_profile_runs_end_to_end_on_a_cpu_subset(project):
    archive = project / "cifar-10-python.tar.gz"
    write_synthetic_cifar10(archive, per_batch=20, n_test=40)
    commit_all(project, "synthetic cifar10 archive")
    sets = [a for o in [f"data.path={archive}", *TINY_CPU] for a in ("--set", o)]
    r = run_cmd(project, sys.executable, "-m", "flows.profile", "cifar10", *sets, "shard", "teacher", "featurizer")
    assert r.returncode == 0, r.stderr[-3000:]

    # The overrides went through DVC: params.yaml and dvc.lock both hold the profile's values.
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["data"]["source"] == "cifar10" and params["model"]["unet"]["channel_mult"] == [1, 2, 2, 2]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["teacher"]["params"]["params.yaml"]["teacher"]["conditional"] is True
    assert lock["shard"]["params"]["params.yaml"]["data"]["max_samples"] == 120

    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert manifest["shape"] == [3, 32, 32] and manifest["kind"] == "image"
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 120
    spec = json.loads((project / "models/teacher/model.json").read_text())
    assert spec["network"]["kind"] == "unet" and spec["num_classes"] == 10
    assert spec["network"]["kwargs"]["image_size"] == 32
    assert spec["network"]["kwargs"]["attention_resolutions"] == [16]
    assert json.loads((project / "data/teacher/metrics.json").read_text())["steps"] == 3

    r = run_flows(project, "evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((project / "data/evaluate/metrics.json").read_text())
    assert metrics["kind"] == "image" and metrics["floor"]["fd"] > 0
    for nfe in ("1", "2"):
        entry = metrics["models"]["teacher"]["nfe"][nfe]
        assert entry["fd"] >= 0 and 0.0 <= entry["class_accuracy"] <= 1.0

    # A UNet that halves 32x32 six times does not fit: one line naming both sizes, nothing written.
    set_params(project, {"model": {"unet": {**params["model"]["unet"], "channel_mult": [1, 1, 1, 1, 1, 1, 1]}}})
    before = (project / "models/teacher/model.pt").read_bytes()
    r = run_flows(project, "teacher")
    assert r.returncode == 2
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "32x32" in error[0] and "multiple of 64" in error[0], r.stderr[-2000:]
    assert (project / "models/teacher/model.pt").read_bytes() == before
