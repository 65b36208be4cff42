"""Diffusion-DPO on the default data: win rate over the reference on held-out seeds and quality drift, as beta varies.

Same code path as the preferences and dpo stages (collect_pairs, the recipe's dpo task, evaluate_alignment), without
DVC/Prefect/MLflow. The teacher (default params: flow objective, MLP 256x4, 3000 steps) is trained once into
--workdir and reused by later runs.

    .venv/bin/python -m benchmarks.bench_dpo --workdir /tmp/dpo_bench --betas 50 200 1000 --out benchmarks/results/dpo.json
"""
from __future__ import annotations

import sys

import argparse
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from components.config import DataParams, DPOParams, ModelParams, PreferencesParams, TeacherParams
from components.data.shards import read_split, write_shards
from components.data.sources import load_source
from components.io import write_json
from components.models.store import SPEC_FILE, WEIGHTS_FILE, load_denoiser
from components.preferences.alignment import evaluate_alignment, heldout_implicit_accuracy
from components.preferences.finetune import dpo_task, time_sampler_for
from components.preferences.pairs import collect_pairs, write_pair_shards
from components.preferences.rewards import make_reward
from components.objectives.dpo import default_mse_target
from components.training.denoiser_training import denoiser_task, objective_config, teacher_spec
from components.training.recipe import TrainJob, run_job, set_torch_threads, task_ref


def prepare_teacher(workdir: Path, teacher_steps: int) -> Path:
    shards, teacher = workdir / "shards", workdir / "teacher"
    if not (shards / "manifest.json").exists():
        shards.mkdir(parents=True, exist_ok=True)
        manifest = write_shards(load_source(DataParams()), shards, val_fraction=0.2, samples_per_shard=2000,
                                min_shards=4, seed=0, progress=False)
        write_json(shards / "manifest.json", manifest)
    if not (teacher / WEIGHTS_FILE).exists():
        import json

        from components.data.shards import read_shard_manifest

        params = TeacherParams(steps=teacher_steps, batch_size=512)
        spec = teacher_spec(read_shard_manifest(shards), ModelParams(), params)
        started = time.time()
        run_job(TrainJob(task_ref(denoiser_task), {"spec": spec, "objective": objective_config(spec, params), "shards": str(shards)},
                         params.train_config(progress_bar=False).model_dump(mode="json"), str(workdir / "ckpt_teacher"),
                         str(teacher / WEIGHTS_FILE)))
        (teacher / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        print(f"teacher trained in {time.time() - started:.0f} s")
    return teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dpo_bench"))
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--betas", type=float, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="DPO steps (default: params default)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    teacher_dir = prepare_teacher(args.workdir, args.teacher_steps)
    reference = load_denoiser(teacher_dir)
    set_torch_threads(reference.spec)
    prefs, dpo = PreferencesParams(), DPOParams()
    reward = make_reward(prefs.reward.model_dump())
    started = time.time()
    pairs = collect_pairs(reference, reward, groups=prefs.groups, k=prefs.k, min_margin=prefs.min_margin,
                          seed=prefs.seed, nfe=prefs.nfe)
    collect_seconds = time.time() - started
    train_pairs, heldout_pairs = pairs.split(dpo.holdout_fraction, dpo.seed)
    val_x, val_y = read_split(args.workdir / "shards", "val")
    real_x, real_y = torch.from_numpy(val_x), torch.from_numpy(val_y)
    pair_dir = args.workdir / "pairs"
    pair_dir.mkdir(parents=True, exist_ok=True)
    write_pair_shards(pairs, pair_dir, info={"reward": prefs.reward.model_dump()})
    train = dpo.train_config(progress_bar=False, **({"steps": args.steps} if args.steps else {}),
                             **({"lr": args.lr} if args.lr else {})).model_dump(mode="json")
    results = {"pairs": len(pairs), "collect_seconds": round(collect_seconds, 1), "train": train,
               "reward": prefs.reward.model_dump(), "betas": {}}
    for beta in args.betas or [dpo.beta]:
        out = args.workdir / f"dpo_beta{beta:g}"
        started = time.time()
        run_job(TrainJob(task_ref(dpo_task), {"reference": str(teacher_dir), "pairs": str(pair_dir), "beta": beta,
                                 "holdout_fraction": dpo.holdout_fraction, "split_seed": dpo.seed},
                         train, str(out / "ckpt"), str(out / "model" / WEIGHTS_FILE)))
        seconds = time.time() - started
        (out / "model" / SPEC_FILE).write_text((teacher_dir / SPEC_FILE).read_text())
        tuned = load_denoiser(out / "model")
        block = evaluate_alignment(reference, tuned, reward, n=args.n_eval, seed=0, real_x=real_x, real_y=real_y)
        block["implicit_accuracy"] = heldout_implicit_accuracy(
            tuned.denoiser, reference.denoiser, heldout_pairs, beta, time_sampler_for(reference.spec),
            target=default_mse_target(reference.spec["prediction"]))
        block["train_seconds"] = round(seconds, 1)
        results["betas"][f"{beta:g}"] = block
        print(f"beta {beta:g}: win {block['win_rate']:.3f}  reward {block['reward_mean']['reference']:.3f} -> "
              f"{block['reward_mean']['dpo']:.3f}  drift {block['quality_drift']:.3f} "
              f"(plain sw2 ratio {block['quality']['sw2_ratio']:.2f})  implicit acc {block['implicit_accuracy']:.3f}"
              f"  {seconds:.0f} s", flush=True)
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
