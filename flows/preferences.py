"""`preferences` stage: preference pairs for Diffusion-DPO -> data/pairs/ (WebDataset shards + manifest).

Either sample K per condition group from the reference model (`preferences.model`, the teacher by default),
score them with the configured reward and pair them by rank with a minimum margin (components/preferences/
pairs.py), or read labelled pairs from `preferences.pairs_file` (JSONL) and fit a Bradley-Terry reward model on
them (saved in data/pairs/reward_model/, so evaluation scores with the same reward). The manifest records the
reward, the seeds scheme, and the generating model's MLflow run id.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from components.config import Params
from components.errors import DataError
from components.models.store import load_denoiser
from components.preferences.bradley_terry import labelled_pairs_scored
from components.preferences.pairs import SEED_BASE, collect_pairs, pair_metrics, write_pair_shards
from components.preferences.rewards import make_reward
from components.training.recipe import set_torch_threads
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="preferences", output="data/pairs", inputs=("models/teacher",), sections=("preferences",))
REWARD_MODEL_DIR = "reward_model"


def resolve_spec(repo: Path, params: Params) -> StageSpec:
    """Inputs from params: the generating model, plus the reference classifier for the classifier reward."""
    model = f"models/{params.preferences.model}"
    inputs = (model,) + (("models/featurizer",) if params.preferences.reward.kind == "classifier" else ())
    return dataclasses.replace(SPEC, inputs=inputs)


def make_pairs(ctx: StageContext) -> dict:
    p = ctx.params.preferences
    model_dir = ctx.path(f"models/{p.model}")
    model = load_denoiser(model_dir)
    set_torch_threads(model.spec)
    generating_run = next((r["run_id"] for r in ctx.inputs if r["path"] == f"models/{p.model}"), None)
    ctx.record["generating_run_id"] = generating_run
    info = {"generating_model": f"models/{p.model}"}
    if p.pairs_file:
        path = Path(p.pairs_file) if Path(p.pairs_file).is_absolute() else ctx.repo / p.pairs_file
        pairs = labelled_pairs_scored(path, model.spec["data_shape"], model.num_classes,
                                      ctx.path("checkpoints/preferences/reward_model"), ctx.out_dir / REWARD_MODEL_DIR,
                                      steps=p.reward_model_steps, seed=p.seed)
        reward_spec = {"kind": "bradley_terry", "path": REWARD_MODEL_DIR}
        info.update({"source": "labelled_file", "pairs_file": p.pairs_file})
    else:
        if p.reward.kind == "bradley_terry":
            raise DataError("preferences.reward.kind bradley_terry is fitted from labelled pairs: set "
                            "preferences.pairs_file")
        reward_spec = p.reward.model_dump()
        reward = make_reward(reward_spec, classifier_dir=ctx.path("models/featurizer"))
        pairs = collect_pairs(model, reward, groups=p.groups, k=p.k, min_margin=p.min_margin, seed=p.seed,
                              nfe=p.nfe)
        info.update({"source": "model", "groups": p.groups, "k": p.k, "min_margin": p.min_margin, "nfe": p.nfe,
                     "seeds": f"sample j of group g: noise randn(data_shape) seeded {SEED_BASE} * (1 + {p.seed}) "
                              "+ g * k + j"})
    manifest = write_pair_shards(pairs, ctx.out_dir, info={"reward": reward_spec, **info})
    ctx.manifest.update(manifest)
    ctx.run.set_tags({"generating_run_id": generating_run or ""})
    return pair_metrics(pairs, None if p.pairs_file else p.groups * (p.k // 2))


@flow(name="preferences", description="Sample, score and pair (or read labelled pairs) -> data/pairs/.")
def flow_fn():
    return run_stage_in_flow(resolve_spec, make_pairs)
