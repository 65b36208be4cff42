"""Teacher quality vs training budget for each objective, on the default data (checkerboard).

    python benchmarks/bench_teacher.py [--objectives edm eps flow] [--milestones 500 1000 2000 3000]

Trains with the real Trainer (same code path as the teacher stage: the recipe's denoiser task on WebDataset shards), and at
each milestone evaluates sliced-W2 and MMD against the held-out split at several NFE, as ratios to the floor
(the same metric between two disjoint real sets). Also reports the fraction of samples on the board's black
squares (1.0 for data, ~0.5 for a Gaussian blob). Writes benchmarks/results/teacher.json.
"""
from __future__ import annotations

import sys

import argparse
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from components.config import DataParams, ModelParams, TeacherParams
from components.data.shards import read_split, write_shards
from components.data.sources import load_source
from components.evaluation.metrics import mmd_rbf, sliced_wasserstein2
from components.io import write_json
from components.models.store import load_denoiser, save_denoiser
from components.training.denoiser_training import denoiser_task, objective_config, teacher_spec
from components.training.recipe import TrainJob, run_job, task_ref

RESULTS = Path(__file__).resolve().parent / "results"


def on_black_squares(x: torch.Tensor) -> float:
    cell = torch.floor(x + 2).long()
    return float((((cell[:, 0] + cell[:, 1]) % 2 == 0) & (x.abs() <= 2).all(1)).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", nargs="+", default=["edm", "eps", "flow"])
    ap.add_argument("--milestones", nargs="+", type=int, default=[500, 1000, 2000, 3000])
    ap.add_argument("--nfe", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--n-eval", type=int, default=2000)
    args = ap.parse_args()
    teacher_defaults = TeacherParams()
    results: dict = {"milestones": args.milestones, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        shards.mkdir()
        manifest = write_shards(load_source(DataParams()), shards, val_fraction=0.2, samples_per_shard=2000,
                                min_shards=4, seed=0, progress=False)
        write_json(shards / "manifest.json", manifest)
        val = torch.from_numpy(read_split(shards, "val")[0])
        ref, half_a, half_b = val[: args.n_eval], val[: len(val) // 2], val[len(val) // 2:]
        floor = {"sw2": sliced_wasserstein2(half_a, half_b), "mmd": mmd_rbf(half_a, half_b)}
        results["floor"] = floor
        print(f"floor: sw2 {floor['sw2']:.4f} mmd {floor['mmd']:.5f}")
        for name in args.objectives:
            p = TeacherParams(objective=name)
            spec = teacher_spec(manifest, ModelParams(), p)
            objective = objective_config(spec, p)
            ckpt, out = tmp / f"ckpt-{name}", tmp / f"model-{name}"
            rows, trained_seconds = [], 0.0
            for milestone in args.milestones:
                train = p.train_config(steps=milestone, checkpoint_every=milestone, progress_bar=False)
                start = time.time()
                run_job(TrainJob(task_ref(denoiser_task), {"spec": spec, "objective": objective, "shards": str(shards)},
                                 train.model_dump(mode="json"), str(ckpt), str(out / "model.pt")))
                trained_seconds += time.time() - start
                save_denoiser(out, torch.load(out / "model.pt"), spec)
                model = load_denoiser(out)
                g = torch.Generator().manual_seed(0)
                noise = torch.randn(len(ref), 2, generator=g)
                row = {"steps": milestone, "train_seconds": round(trained_seconds, 1), "nfe": {}}
                for nfe in args.nfe:
                    x = model.sample(noise, nfe=nfe).x
                    sw, mmd = sliced_wasserstein2(x, ref), mmd_rbf(x, ref)
                    row["nfe"][nfe] = {"sw2_ratio": sw / floor["sw2"], "mmd_ratio": mmd / floor["mmd"],
                                       "black": on_black_squares(x)}
                best = min(row["nfe"].values(), key=lambda r: r["sw2_ratio"])
                row["best"] = best
                rows.append(row)
                print(f"{name:5s} steps {milestone:5d} ({trained_seconds:6.1f}s): best sw2 {best['sw2_ratio']:.2f}x floor, "
                      f"mmd {best['mmd_ratio']:.2f}x, black {best['black']:.3f} | " +
                      " ".join(f"nfe{k}:{v['sw2_ratio']:.2f}" for k, v in row["nfe"].items()), flush=True)
            results["runs"][name] = rows
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "teacher.json", results)


if __name__ == "__main__":
    main()
