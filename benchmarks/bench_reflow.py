"""Reflow targets on the default data: couplings + reflow with the default params, scored like the evaluate stage.

    python benchmarks/bench_reflow.py --teacher <model dir> --shards <shard dir> [--steps N] [--rounds K]

Needs a trained teacher (models/teacher after `dvc repro teacher`, or any model dir in the store format) and the
shards it was trained on. Generates the couplings (couplings params defaults), trains the reflow student with the
one Trainer (reflow params defaults unless overridden), distils it into `reflow.distill_nfe` Euler steps as the
stage does (`--distill-nfe 0`: skip), then measures on fixed noise against the held-out split: SW2 at NFE 1, 2, 4, 8
of the rectified model and of the distilled one (teacher also at 16, 32, 64 for its best) and the straightness of
the models' Euler paths (32 steps, uniform flow time, as in the evaluate stage). Checks the issue's targets on the
stage's output model (the distilled one when distilling): straightness of the rectified paths <= 0.2x teacher,
1-step SW2 <= 0.5x teacher's 1-step, 2-step SW2 <= 1.2x teacher's best.
Writes benchmarks/results/reflow.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from components.config import CouplingsParams, ReflowParams  # noqa: E402  (after the path insert)
from components.data.shards import read_split
from components.evaluation.metrics import disjoint_subsets, sliced_wasserstein2
from components.io import write_json
from components.models.store import WEIGHTS_FILE, load_denoiser, model_from_weights
from components.training.recipe import TrainJob, run_job, set_torch_threads, task_ref
from components.training.reflow_training import (coupling_error, chunk_noise, coupling_task, generate_couplings,
                                                 path_straightness,
                                                 student_spec, write_coupling_shards)

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="reflow steps (default: reflow params default)")
    ap.add_argument("--count", type=int, default=None, help="coupling pairs (default: couplings params default)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--distill-nfe", type=int, default=None, help="Euler steps to distil into (default: params; 0 off)")
    ap.add_argument("--n-eval", type=int, default=2000)
    args = ap.parse_args()
    cp = CouplingsParams(**({"count": args.count} if args.count else {}))
    rp = ReflowParams(**({"steps": args.steps} if args.steps else {}),
                      **({"distill_nfe": args.distill_nfe} if args.distill_nfe is not None else {}))
    teacher = load_denoiser(args.teacher)
    set_torch_threads(teacher.spec)
    out: dict = {"couplings": cp.model_dump(), "reflow": rp.model_dump()}

    z_check, _ = chunk_noise(cp.seed, 0, cp.error_samples, [2], None)
    out["coupling_relative_error"] = coupling_error(teacher, z_check, None, cp.nfe, cp.solver)
    spec = student_spec(teacher.spec, rp.sampler_steps)
    model, weights = teacher, args.teacher / WEIGHTS_FILE

    def train_on(couplings_dir: Path, init: Path, objective: dict, steps: int, work: Path) -> Path:
        job = TrainJob(task_ref(coupling_task), {"spec": spec, "init": str(init), "objective": objective,
                                    "couplings": str(couplings_dir)},
                       rp.train_config(steps=steps, progress_bar=False).model_dump(mode="json"), str(work / "ckpt"),
                       str(work / "export.pt"))
        run_job(job)
        return Path(job.export)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        timings = []
        for round_no in range(1, args.rounds + 1):
            started = time.time()
            z, x, y, _ = generate_couplings(model, cp.count, cp.batch_size, cp.nfe, cp.solver,
                                            cp.seed + 7919 * (round_no - 1), tmp / f"c{round_no}", progress=False)
            generated = time.time()
            couplings_dir = tmp / f"c{round_no}" / "shards"
            couplings_dir.mkdir(parents=True)
            write_coupling_shards(couplings_dir, z, x, y, samples_per_shard=cp.samples_per_shard,
                                  samples_per_record=cp.samples_per_record)
            weights = train_on(couplings_dir, weights, {"name": "reflow", "p_uncond": 0.0, "num_classes": None},
                               rp.steps, tmp / f"k{round_no}")
            model = model_from_weights(spec, weights)
            timings.append({"couplings_seconds": round(generated - started, 1),
                            "train_seconds": round(time.time() - generated, 1)})
        rectified = model
        if rp.distill_nfe:  # as the stage: distil the k-RF model on the last round's coupling
            started = time.time()
            weights = train_on(couplings_dir, weights, {"name": "euler_distill", "nfe": rp.distill_nfe},
                               rp.distill_steps, tmp / "distill")
            model = model_from_weights(spec, weights)
            timings.append({"distill_seconds": round(time.time() - started, 1)})
        out["timings"] = timings

    val = torch.from_numpy(read_split(args.shards, "val")[0])
    n = min(args.n_eval, len(val) // 2)
    reference, floor_set = disjoint_subsets(val, n)
    floor = sliced_wasserstein2(reference, floor_set)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    sw = {"teacher": {}, "rectified": {}, "reflow": {}}
    for nfe in (1, 2, 4, 8, 16, 32, 64):
        sw["teacher"][nfe] = sliced_wasserstein2(teacher.sample(noise, nfe=nfe).x, reference)
        if nfe <= 8:
            sw["rectified"][nfe] = sliced_wasserstein2(rectified.sample(noise, nfe=nfe).x, reference)
            sw["reflow"][nfe] = sliced_wasserstein2(model.sample(noise, nfe=nfe).x, reference)
    s_teacher, s_reflow = path_straightness(teacher, noise, None), path_straightness(rectified, noise, None)
    out["straightness_distilled"] = path_straightness(model, noise, None)
    best_teacher = min(sw["teacher"].values())
    out.update({"floor_sw2": floor, "sw2": sw, "straightness": {"teacher": s_teacher, "reflow": s_reflow},
                "targets": {
                    "straightness_ratio": s_reflow / s_teacher, "straightness_target": 0.2,
                    "one_step_ratio": sw["reflow"][1] / sw["teacher"][1], "one_step_target": 0.5,
                    "two_step_over_teacher_best": sw["reflow"][2] / best_teacher, "two_step_target": 1.2}})
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "reflow.json", out)
    t = out["targets"]
    print(f"floor sw2 {floor:.4f}; teacher best sw2 {best_teacher:.4f}; timings {timings}")
    print("sw2 teacher " + " ".join(f"{k}:{v:.4f}" for k, v in sw["teacher"].items()))
    print("sw2 rectified " + " ".join(f"{k}:{v:.4f}" for k, v in sw["rectified"].items()))
    print(f"sw2 reflow (distilled to {rp.distill_nfe} steps) " + " ".join(f"{k}:{v:.4f}" for k, v in sw["reflow"].items()))
    print(f"straightness teacher {s_teacher:.4f} rectified {s_reflow:.4f} (distilled "
          f"{out['straightness_distilled']:.4f}) ratio {t['straightness_ratio']:.3f} (<= 0.2)")
    print(f"1-step ratio {t['one_step_ratio']:.3f} (<= 0.5); 2-step / teacher best {t['two_step_over_teacher_best']:.3f}"
          f" (<= 1.2); coupling error {out['coupling_relative_error']:.2e}")


if __name__ == "__main__":
    main()
