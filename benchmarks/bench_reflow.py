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
from components.diffusion.grids import make_grid
from components.diffusion.samplers import sample
from components.evaluation.metrics import disjoint_subsets, sliced_wasserstein2, straightness
from components.io import write_json
from components.models.store import load_denoiser
from components.objectives.reflow import EulerDistillObjective, ReflowObjective
from components.training.denoiser_training import set_torch_threads
from components.training.reflow_training import (coupling_error, chunk_noise, generate_couplings,
                                                 loaded_from_state, student_spec, train_on_coupling)

RESULTS = Path(__file__).resolve().parent / "results"


def euler_straightness(model, noise, steps: int = 32) -> float:
    grid = make_grid("uniform", model.schedule, steps)
    with torch.no_grad():
        result = sample(model.denoiser, model.schedule, grid, noise, method="euler", return_trajectory=True)
    return straightness(result.trajectory, grid)


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
    model, state = teacher, teacher.denoiser.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        timings = []
        for round_no in range(1, args.rounds + 1):
            started = time.time()
            z, x, y, _ = generate_couplings(model, cp.count, cp.batch_size, cp.nfe, cp.solver,
                                            cp.seed + 7919 * (round_no - 1), tmp / f"c{round_no}", progress=False)
            generated = time.time()
            train_on_coupling(spec, state, ReflowObjective(), (z, x, y), rp.trainer_kwargs(), tmp / f"k{round_no}",
                              tmp / f"m{round_no}.pt", progress=False)
            state = torch.load(tmp / f"m{round_no}.pt", weights_only=True)
            model = loaded_from_state(spec, state, tmp)
            timings.append({"couplings_seconds": round(generated - started, 1),
                            "train_seconds": round(time.time() - generated, 1)})
        rectified = model
        if rp.distill_nfe:  # as the stage: distil the k-RF model on the last round's coupling
            started = time.time()
            distill_train = {**rp.trainer_kwargs(), "steps": rp.distill_steps}
            train_on_coupling(spec, state, EulerDistillObjective(rp.distill_nfe), (z, x, y), distill_train,
                              tmp / "distill", tmp / "distilled.pt", progress=False)
            model = loaded_from_state(spec, torch.load(tmp / "distilled.pt", weights_only=True), tmp)
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
    s_teacher, s_reflow = euler_straightness(teacher, noise), euler_straightness(rectified, noise)
    out["straightness_distilled"] = euler_straightness(model, noise)
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
