"""`couplings` stage: integrate the teacher's ODE from fixed-seed noise to get reflow couplings (z, x = teacher(z),
label) and write them as WebDataset shards to data/couplings/shards/ with a manifest (count, solver, NFE, teacher
run id and weights digest). Finished chunks are kept in checkpoints/couplings/<fingerprint>/ (outside the DVC
output), so an interrupted run regenerates only what is missing. The integration error is measured against a
4x-NFE solve and a warning names couplings.nfe when it exceeds couplings.max_error.
"""
from __future__ import annotations

import shutil
import time
import warnings

from prefect import flow, get_run_logger

from components.models.store import load_denoiser
from components.objectives.reflow import transport_cost
from components.training.recipe import fingerprint, set_torch_threads
from components.training.reflow_training import (chunk_noise, couplings_on_ranks, coupling_error, generate_couplings,
                                                 teacher_identity, write_coupling_shards)
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="couplings", output="data/couplings/shards", sections=("couplings",))


def make_couplings(ctx: StageContext) -> dict:
    p = ctx.params.couplings
    teacher_dir = ctx.path("models/teacher")
    teacher = load_denoiser(teacher_dir)
    set_torch_threads(teacher.spec, sampling=True)
    identity = teacher_identity(teacher_dir)
    settings = {"solver": p.solver, "nfe": p.nfe, "seed": p.seed, "batch_size": p.batch_size}
    work_dir = ctx.path(f"checkpoints/couplings/{fingerprint(identity['weights_md5'], settings)}")

    # Accuracy check on the first chunk's noise: the same couplings the stage writes, re-solved at 4x NFE.
    z_check, y_check = chunk_noise(p.seed, 0, min(p.error_samples, p.batch_size), list(teacher.spec["data_shape"]),
                                   teacher.num_classes)
    error = coupling_error(teacher, z_check, y_check, p.nfe, p.solver)
    if error > p.max_error:
        message = (f"couplings.nfe={p.nfe} is too small for an accurate coupling: relative RMS error {error:.3g} vs "
                   f"a {4 * p.nfe}-NFE {p.solver} solve exceeds couplings.max_error={p.max_error}")
        get_run_logger().warning(message)
        warnings.warn(message, stacklevel=1)

    started = time.time()
    ranks = ctx.params.distributed.world_size
    found = 0
    if ranks > 1:  # the ranks solve the chunks; generate_couplings below then reads them in order
        found = couplings_on_ranks(teacher_dir, p.count, p.batch_size, p.nfe, p.solver, p.seed, work_dir,
                                   ctx.params.distributed)
    z, x, y, reused = generate_couplings(teacher, p.count, p.batch_size, p.nfe, p.solver, p.seed, work_dir)
    seconds = time.time() - started
    shards = write_coupling_shards(ctx.out_dir, z, x, y, p.samples_per_shard, p.samples_per_record)
    ctx.manifest.update({
        "format": "webdataset", "record_keys": ["z.npy", "x.npy"] + (["cls.npy"] if y is not None else []),
        "convention": "z: noise at t = 1; x: teacher ODE solution at t = 0 (data)",
        "count": len(z), "shards": shards, "data_shape": list(teacher.spec["data_shape"]),
        "num_classes": teacher.num_classes, "solver": p.solver, "nfe": p.nfe, "grid": "uniform", "seed": p.seed,
        "relative_error_vs_4x_nfe": error, "teacher": identity,
        # the teacher's default classifier-free guidance is baked into x (conditional teachers only)
        "guidance": float(teacher.spec["sampler"].get("guidance", 1.0)) if teacher.num_classes else None,
    })
    shutil.rmtree(work_dir, ignore_errors=True)  # the chunks only serve a resume; the shards are the output
    return {"count": len(z), "nfe": p.nfe, "relative_error": error, "processes": ranks,
            "reused_chunks": reused if ranks == 1 else found,
            "generate_seconds": round(seconds, 2), "couplings_per_sec": round((len(z)) / max(seconds, 1e-9), 1),
            "transport_cost": transport_cost(z, x)}


@flow(name="couplings", description="Teacher ODE couplings (z, x) for reflow -> data/couplings/shards/ (WebDataset).")
def flow_fn():
    return run_stage_in_flow(SPEC, make_couplings)
