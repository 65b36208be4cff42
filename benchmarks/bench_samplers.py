"""Sampler step cost: our samplers (through `components.diffusion.samplers.sample`) against diffusers'
schedulers at equal NFE and batch on the same denoiser (the default 4x256 residual MLP on 2-D points, one torch
thread, no grad), as a ratio taken in one run.

Pairs (ours <-> diffusers, each driven the way its own sampling loop drives it):
    euler    on the flow schedule   <-> FlowMatchEulerDiscreteScheduler (velocity output)
    ddim     on vp_linear (eta=0)   <-> DDIMScheduler (prediction "sample", trailing spacing)
    dpmpp_2m on vp_linear           <-> DPMSolverMultistepScheduler (dpmsolver++, order 2, prediction "sample")
    heun     on vp_linear           <-> HeunDiscreteScheduler (prediction "sample"; scale_model_input each call)
Both sides call the same Denoiser module the same number of times (asserted); only the bookkeeping around the
calls differs, so the ratio is the sampler's own cost. Repeats are interleaved (ours, diffusers, denoiser alone)
so machine load hits both sides alike; times are the thread's CPU time (waiting for a core on a loaded
machine is not counted), the spread is over repeats. `overhead_us_per_nfe` is (sampler time -
the same number of bare denoiser calls) / NFE.

    python benchmarks/bench_samplers.py [--repeats 7] [--batches 256 2000] [--nfe 8 32]

Needs diffusers (`pip install -c constraints.txt diffusers`, not a pipeline dependency).
Writes benchmarks/results/samplers.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from components.diffusion.grids import make_grid
from components.diffusion.samplers import sample, steps_for_nfe
from components.io import write_json
from components.models.store import build_denoiser

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_STEPS = 1000  # diffusers' discrete time axis; index k <-> continuous t = (k + 1) / 1000 on vp_linear


def make_denoiser(schedule: str, prediction: str) -> torch.nn.Module:
    spec = {"network": {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 256, "depth": 4, "embed_dim": 64}},
            "schedule": {"name": schedule, "kwargs": {}}, "prediction": prediction, "sigma_data": 0.5}
    torch.manual_seed(0)
    denoiser = build_denoiser(spec).eval()
    for p in denoiser.parameters():  # the zero-initialised output layer would make the net trivially cheap
        torch.nn.init.normal_(p, std=0.05)
    return denoiser


class Counted:
    """The denoiser with a call counter, so both sides are checked to spend the same NFE."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond=None, target: str = "x0") -> torch.Tensor:
        self.calls += 1
        return self.denoiser(x, t, cond, target=target)


def diffusers_loop(scheduler, model_output: Callable, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """A diffusers pipeline's denoising loop: set_timesteps, init_noise_sigma, scale_model_input, model, step."""
    scheduler.set_timesteps(steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: none, and no input scaling
    scale = getattr(scheduler, "scale_model_input", lambda x, timestep: x)
    for timestep in scheduler.timesteps:
        model_input = scale(x, timestep)
        x = scheduler.step(model_output(model_input, timestep), timestep, x).prev_sample
    return x


def cases(batch: int, nfe: int):
    """Yield (name, ours(noise), diffusers(noise), denoiser, nfe) for each sampler pair."""
    import diffusers

    flow = Counted(make_denoiser("flow", "v"))
    vp = Counted(make_denoiser("vp_linear", "eps"))
    vp_schedule = vp.denoiser.schedule

    def vp_time(timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), (float(timestep) + 1.0) / TRAIN_STEPS, dtype=x.dtype)

    def ours(denoiser: Counted, method: str, grid_kind: str) -> Callable:
        steps = steps_for_nfe(method, nfe)
        grid = make_grid(grid_kind, denoiser.denoiser.schedule, steps)
        return lambda noise: sample(denoiser, denoiser.denoiser.schedule, grid, noise, method=method).x

    flow_euler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_STEPS, shift=1.0)
    yield ("euler/flow", ours(flow, "euler", "uniform"),
           lambda noise: diffusers_loop(flow_euler, lambda x, ts: flow(x, torch.full((x.shape[0],), float(ts) / TRAIN_STEPS),
                                                                  target="v"), noise, nfe), flow)
    vp_kwargs = dict(num_train_timesteps=TRAIN_STEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                     prediction_type="sample")
    ddim = diffusers.DDIMScheduler(**vp_kwargs, timestep_spacing="trailing", set_alpha_to_one=True)
    yield ("ddim/vp_linear", ours(vp, "ddim", "uniform"),
           lambda noise: diffusers_loop(ddim, lambda x, ts: vp(x, vp_time(ts, x)), noise, nfe), vp)
    dpm = diffusers.DPMSolverMultistepScheduler(**vp_kwargs, algorithm_type="dpmsolver++", solver_order=2,
                                                lower_order_final=True)
    yield ("dpmpp_2m/vp_linear", ours(vp, "dpmpp_2m", "logsnr"),
           lambda noise: diffusers_loop(dpm, lambda x, ts: vp(x, vp_time(ts, x)), noise, nfe), vp)
    heun = diffusers.HeunDiscreteScheduler(**vp_kwargs)
    heun_steps = steps_for_nfe("heun", nfe)  # 2 n - 1 calls on both sides
    # HeunDiscrete's model input is x / sqrt(sigma^2 + 1), i.e. the VP-scaled point: our VP denoiser's input.
    yield ("heun/vp_linear", ours(vp, "heun", "uniform"),
           lambda noise: diffusers_loop(heun, lambda x, ts: vp(x, vp_time(ts, x)), noise, heun_steps), vp)


def seconds(fn: Callable[[], object]) -> float:
    """CPU seconds of this thread (torch runs on one thread here): on a loaded machine, time spent waiting for a
    core is not the sampler's cost, and wall time would mostly measure the neighbours."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 2000])
    ap.add_argument("--nfe", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("error: diffusers is not installed (it is only a benchmark dependency): "
                         ".venv/bin/pip install -c constraints.txt diffusers")
    torch.set_num_threads(1)  # as in the pipeline's stages
    rows = []
    with torch.no_grad():
        for batch in args.batches:
            for nfe in args.nfe:
                noise = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))
                for name, ours, theirs, counted, in cases(batch, nfe):
                    counted.calls = 0
                    ours(noise)
                    ours_calls, counted.calls = counted.calls, 0
                    theirs(noise)  # warm-up, and check equal NFE
                    if counted.calls != ours_calls:
                        raise SystemExit(f"{name}: NFE differs, ours {ours_calls} vs diffusers {counted.calls}")
                    t_probe = torch.full((batch,), 0.5)
                    bare = lambda: [counted.denoiser(noise, t_probe) for _ in range(ours_calls)]
                    t_ours, t_theirs, t_bare = [], [], []
                    for _ in range(args.repeats):
                        t_ours.append(seconds(lambda: ours(noise)))
                        t_theirs.append(seconds(lambda: theirs(noise)))
                        t_bare.append(seconds(bare))
                    ratios = [a / b for a, b in zip(t_ours, t_theirs)]
                    row = {"sampler": name, "batch": batch, "nfe": ours_calls,
                           "ours_ms_per_nfe": spread([1e3 * t / ours_calls for t in t_ours]),
                           "diffusers_ms_per_nfe": spread([1e3 * t / ours_calls for t in t_theirs]),
                           "denoiser_ms_per_call": spread([1e3 * t / ours_calls for t in t_bare]),
                           "ratio_ours_over_diffusers": spread(ratios),
                           "ours_overhead_us_per_nfe": spread([1e6 * (a - c) / ours_calls for a, c in zip(t_ours, t_bare)]),
                           "diffusers_overhead_us_per_nfe": spread([1e6 * (b - c) / ours_calls
                                                                    for b, c in zip(t_theirs, t_bare)])}
                    rows.append(row)
                    r = row["ratio_ours_over_diffusers"]
                    print(f"{name:20s} batch {batch:5d} NFE {ours_calls:3d}: ours {row['ours_ms_per_nfe']['median']:.3f} "
                          f"ms/NFE, diffusers {row['diffusers_ms_per_nfe']['median']:.3f} ms/NFE, ratio "
                          f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]; overhead/NFE ours "
                          f"{row['ours_overhead_us_per_nfe']['median']:.0f} us, diffusers "
                          f"{row['diffusers_overhead_us_per_nfe']['median']:.0f} us", flush=True)
    import diffusers

    result = {"rows": rows, "repeats": args.repeats, "diffusers": diffusers.__version__, "torch": torch.__version__,
              "threads": 1, "load_average": os.getloadavg(),
              "command": "python benchmarks/bench_samplers.py " + " ".join(
                  f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items())}
    print(f"load average {os.getloadavg()[0]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "samplers.json", result)


if __name__ == "__main__":
    main()
