"""Quality of the progressive and consistency students against the teacher on the default data (checkerboard).

    python benchmarks/bench_distill.py [--teacher-dir DIR] [--shards DIR] [--pd-steps 300] [--cd-steps 800]

Uses the default params (params.yaml schema defaults) and the stages' own code paths (progressive_distillation and
the consistency task of the one training recipe). Metric: sliced-W2 against 2000 held-out samples, as a ratio to the floor
(the same metric between two disjoint real halves). Targets (issue 7): best 1-step student <= 1.5x the teacher's
best SW2, best 2-step student <= 1.2x. Writes benchmarks/results/distill.json.
"""
from __future__ import annotations

import sys

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from components.config import ConsistencyParams, DataParams, ModelParams, ProgressiveParams, TeacherParams
from components.data.shards import read_shard_manifest, read_split, write_shards
from components.data.sources import load_source
from components.evaluation.metrics import sliced_wasserstein2
from components.io import write_json
from components.models.store import WEIGHTS_FILE, load_denoiser, save_spec
from components.training.denoiser_training import denoiser_task, objective_config, teacher_spec
from components.training.distillation import (consistency_objective_settings, consistency_spec, consistency_task,
                                              progressive_distillation)
from components.training.recipe import TrainJob, run_job, task_ref

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
        run_job(TrainJob(task_ref(denoiser_task), {"spec": spec, "objective": objective_config(spec, p), "shards": str(shards)},
                         p.train_config(progress_bar=False).model_dump(mode="json"), str(tmp / "ckpt-teacher"),
                         str(args.teacher_dir / WEIGHTS_FILE)))
        save_spec(args.teacher_dir, spec)
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

    pd = ProgressiveParams(progress_bar=False, **({"steps": args.pd_steps} if args.pd_steps else {}))
    start = time.time()
    _, _ = progressive_distillation(teacher, shards, pd, tmp / "ckpt-pd", tmp / "pd", _untracked_child)
    results["progressive"] = {int(n): score(load_denoiser(tmp / "pd" / f"steps_{n}"), int(n))
                              for n in (2 ** k for k in range(pd.teacher_steps.bit_length() - 1))}
    results["progressive_seconds"] = round(time.time() - start, 1)
    print("progressive", results["progressive"], results["progressive_seconds"], "s", flush=True)

    cd = ConsistencyParams(progress_bar=False, **({"steps": args.cd_steps} if args.cd_steps else {}))
    spec = consistency_spec({k: v for k, v in teacher.spec.items() if k != "sampler"}, cd)
    start = time.time()
    run_job(TrainJob(task_ref(consistency_task), {"spec": spec, "teacher": str(args.teacher_dir),
                                     "objective": consistency_objective_settings(cd), "origin": "bench",
                                     "shards": str(shards)},
                     cd.train_config().model_dump(mode="json"), str(tmp / "ckpt-cd"), str(tmp / "cd" / WEIGHTS_FILE)))
    save_spec(tmp / "cd", spec)
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


@contextlib.contextmanager
def _untracked_child(name, params=None, tags=None):
    """Stands in for an MLflow child run: the benchmark logs nothing."""
    yield SimpleNamespace(run_id=None, log_metrics=lambda metrics, step=None: None)


if __name__ == "__main__":
    main()
