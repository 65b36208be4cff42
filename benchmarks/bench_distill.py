"""Quality of the progressive and consistency students against the teacher on the default data (checkerboard).

    python benchmarks/bench_distill.py [--teacher-dir DIR] [--shards DIR] [--pd-steps 300] [--cd-steps 800]

Uses the default params (params.yaml schema defaults) and the stages' own code paths (flows.progressive.train_round,
ConsistencyObjective on the one Trainer). Metric: sliced-W2 against 2000 held-out samples, as a ratio to the floor
(the same metric between two disjoint real halves). Targets (issue 7): best 1-step student <= 1.5x the teacher's
best SW2, best 2-step student <= 1.2x. Writes benchmarks/results/distill.json.
"""
from __future__ import annotations

import sys

import argparse
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from components.config import ConsistencyParams, DataParams, ModelParams, ProgressiveParams, TeacherParams
from components.data.loader import infinite_batches, make_loader
from components.data.shards import read_shard_manifest, read_split, write_shards
from components.data.sources import load_source
from components.evaluation.metrics import sliced_wasserstein2
from components.io import write_json
from components.models.store import build_denoiser, load_denoiser, save_denoiser
from components.objectives.consistency import ConsistencyObjective, ConsistencyPair
from components.training.denoiser_training import objective_config, teacher_spec, train_denoiser
from components.training.trainer import Trainer, TrainConfig
from flows.consistency import student_spec
from flows.progressive import train_round

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-dir", type=Path, default=None, help="a trained teacher model dir (else train one)")
    ap.add_argument("--shards", type=Path, default=None, help="shards of the default data (else written)")
    ap.add_argument("--pd-steps", type=int, default=None)
    ap.add_argument("--cd-steps", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    shards = args.shards
    if shards is None:
        shards = tmp / "shards"
        shards.mkdir()
        write_json(shards / "manifest.json", write_shards(load_source(DataParams()), shards, val_fraction=0.2,
                                                          samples_per_shard=2000, min_shards=4, seed=0, progress=False))
    manifest = read_shard_manifest(shards)
    if args.teacher_dir is None:
        p = TeacherParams()
        spec = teacher_spec(manifest, ModelParams(), p)
        args.teacher_dir = tmp / "teacher"
        train_denoiser(spec, objective_config(spec, p), shards, p.trainer_kwargs(), tmp / "ckpt-teacher",
                       args.teacher_dir / "model.pt", progress=False)
        save_denoiser(args.teacher_dir, torch.load(args.teacher_dir / "model.pt"), spec)
    teacher = load_denoiser(args.teacher_dir)
    val = torch.from_numpy(read_split(shards, "val")[0])
    ref, half_a, half_b = val[: args.n_eval], val[: len(val) // 2], val[len(val) // 2:]
    floor = sliced_wasserstein2(half_a, half_b)
    noise = torch.randn(len(ref), 2, generator=torch.Generator().manual_seed(0))

    def score(model, nfe):
        with torch.no_grad():
            x = model.sample(noise, nfe=nfe, generator=torch.Generator().manual_seed(1)).x
        return sliced_wasserstein2(x, ref) / floor

    results = {"floor_sw2": floor, "teacher": {n: score(teacher, n) for n in (1, 2, 4, 8, 16, 32, 64)}}
    print("teacher", {k: round(v, 2) for k, v in results["teacher"].items()}, flush=True)

    pd = ProgressiveParams(**({"steps": args.pd_steps} if args.pd_steps else {}))
    start, previous, n = time.time(), teacher.denoiser, pd.teacher_steps // 2
    results["progressive"] = {}
    while n >= 1:
        spec = {**teacher.spec, "sampler": {**teacher.spec["sampler"], "method": "ddim", "grid": "uniform", "steps": n}}
        out = tmp / f"pd_{n}"
        train_round(spec, previous, n, shards, {**pd.trainer_kwargs(), "progress_bar": False}, pd.weighting,
                    tmp / f"ckpt-pd-{n}", out / "model.pt", None)
        save_denoiser(out, torch.load(out / "model.pt"), spec)
        student = load_denoiser(out)
        results["progressive"][n] = score(student, n)
        previous, n = student.denoiser, n // 2
    results["progressive_seconds"] = round(time.time() - start, 1)
    print("progressive", results["progressive"], results["progressive_seconds"], "s", flush=True)

    cd = ConsistencyParams(**({"steps": args.cd_steps} if args.cd_steps else {}))
    spec = student_spec({k: v for k, v in teacher.spec.items() if k != "sampler"}, cd)
    student = build_denoiser(spec)
    student.denoiser.load_state_dict(teacher.denoiser.state_dict())
    objective = ConsistencyObjective(mode="distill", teacher=teacher.denoiser, sigma_min=cd.sigma_min,
                                     sigma_max=cd.sigma_max, n_scales=cd.n_scales, rho=cd.rho, target=cd.target,
                                     target_ema=cd.target_ema, huber_c=cd.huber_c)
    config = TrainConfig(**cd.trainer_kwargs(), progress_bar=False)
    start = time.time()
    trainer = Trainer(ConsistencyPair(student), objective, config, tmp / "ckpt-cd")
    trainer.fit(infinite_batches(make_loader(shards, "train", config.batch_size, shuffle=True, drop_last=True)))
    save_denoiser(tmp / "cd", ConsistencyPair.student_state_dict(trainer.ema_state_dict()), spec)
    results["consistency_seconds"] = round(time.time() - start, 1)
    cm = load_denoiser(tmp / "cd")
    results["consistency"] = {n: score(cm, n) for n in (1, 2, 4)}
    print("consistency", results["consistency"], results["consistency_seconds"], "s", flush=True)

    best_teacher = min(results["teacher"].values())
    best = {k: min([results["progressive"].get(k, 1e9), results["consistency"].get(k, 1e9)]) for k in (1, 2)}
    results["targets"] = {"best_teacher_sw2_ratio": best_teacher,
                          "one_step_vs_teacher": best[1] / best_teacher, "one_step_target": 1.5,
                          "two_step_vs_teacher": best[2] / best_teacher, "two_step_target": 1.2}
    print("targets", results["targets"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "distill.json", results)


if __name__ == "__main__":
    main()
