"""Reflow recipe: teacher ODE couplings (generated in resumable chunks, stored as WebDataset shards), and the one
Trainer on those couplings with the reflow (or one-step distillation) loss, initialised from a velocity model.

Couplings: noise z ~ N(0, I) drawn chunk by chunk from fixed seeds (chunk i always gets the same z, whatever was
resumed), x = ODE solve of the model from t = 1 (z) to t = 0. Each finished chunk is saved to a work dir outside
the DVC output, so an interrupted run regenerates only the missing chunks.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from components.config import ReflowParams, TrainConfig
from components.data.memory import shuffled_batches
from components.data.shards import read_array_shards, write_array_shards
from components.errors import DataError
from components.evaluation.straightness import path_straightness as evaluated_straightness
from components.io import file_md5
from components.models.store import (WEIGHTS_FILE, LoadedModel, build_denoiser, load_denoiser, load_weights,
                                     model_from_weights, save_denoiser)
from components.objectives.reflow import EulerDistillObjective, ReflowObjective, coupling_diagnostics
from components.training.distributed import barrier, rank_share, world_info
from components.training.recipe import (TrainingTask, launch_worker, rank_seed, run_job, set_torch_threads, task_ref,
                                        training_job)

COUPLING_PREFIX = "couplings"  # shard files couplings-%06d.tar
CHUNK_SEED_STRIDE = 1_000_003  # chunk i of seed s draws its noise from seed s * stride + i


def student_spec(teacher_spec: dict[str, Any], steps: int = 1) -> dict[str, Any]:
    """The reflow student's model.json: the teacher's network as a velocity model on the flow schedule, sampled
    with Euler on the uniform grid (straight paths need few steps).

    Only a teacher that already is a velocity model on the flow schedule (teacher.objective: flow) is accepted:
    its weights are then the student's exact initialisation. Other teachers are refused (a DataError naming the
    objective) rather than re-parametrised approximately.

    The student samples without guidance (guidance 1): the couplings are solved with the teacher's default sampler,
    so a guided teacher's guidance is already in the pairs' x; guiding the student again would apply it twice.
    """
    schedule = teacher_spec.get("schedule", {}).get("name")
    if schedule != "flow" or teacher_spec.get("prediction") != "v":
        raise DataError(f"reflow initialises from a velocity teacher on the flow schedule (teacher.objective: flow); "
                        f"models/teacher has schedule {schedule!r}, prediction {teacher_spec.get('prediction')!r}")
    spec = {k: v for k, v in teacher_spec.items() if k != "objective"}
    spec["objective"] = "reflow"
    spec["sampler"] = {"method": "euler", "grid": "uniform", "steps": int(steps), "guidance": 1.0}
    return spec


def chunk_noise(seed: int, chunk: int, size: int, shape: list[int],
                num_classes: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The fixed noise (and uniform labels for a conditional model) of one chunk."""
    generator = torch.Generator().manual_seed(seed * CHUNK_SEED_STRIDE + chunk)
    z = torch.randn((size, *shape), generator=generator)
    y = torch.randint(0, num_classes, (size,), generator=generator) if num_classes else None
    return z, y


def solve(model: LoadedModel, z: torch.Tensor, y: Optional[torch.Tensor], nfe: int, solver: str) -> torch.Tensor:
    """x = the model's ODE solution from noise z (t = 1) to data (t = 0), uniform grid, at most `nfe` evaluations."""
    return model.sample(z, nfe=nfe, method=solver, grid="uniform", cond=y).x


def coupling_error(model: LoadedModel, z: torch.Tensor, y: Optional[torch.Tensor], nfe: int,
                   solver: str) -> float:
    """Relative RMS difference between the solve at `nfe` and at 4x `nfe`: the coupling's integration error."""
    coarse = solve(model, z, y, nfe, solver)
    fine = solve(model, z, y, 4 * nfe, solver)
    return float(((coarse - fine) ** 2).mean().sqrt() / (fine ** 2).mean().sqrt().clamp_min(1e-12))


def generate_couplings(model: LoadedModel, count: int, batch_size: int, nfe: int, solver: str, seed: int,
                       work_dir: Path | str, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor,
                                                                              Optional[torch.Tensor], int]:
    """`count` pairs (z, x = ODE(z), labels) in chunks of `batch_size`; finished chunks are kept in `work_dir`.

    Returns (z, x, y or None, chunks reused from an earlier interrupted run). `work_dir` must be specific to the
    model and settings (the caller keys it by a fingerprint).
    """
    if count < batch_size:
        raise DataError(f"couplings.count={count} is smaller than couplings.batch_size={batch_size}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    shape = list(model.spec["data_shape"])
    n_chunks = math.ceil(count / batch_size)
    sizes = [min(batch_size, count - chunk * batch_size) for chunk in range(n_chunks)]
    paths = [work_dir / f"chunk{chunk:06d}.pt" for chunk in range(n_chunks)]
    # Launched on several ranks, each solves its share of the chunks (seeded by chunk index), then all read every
    # chunk in order: the same pairs as one process.
    mine = rank_share(n_chunks)
    reused = 0
    bar = tqdm(total=sum(sizes[c] for c in mine), desc="couplings", unit="pair", disable=not progress, mininterval=1.0)
    for chunk in mine:
        size, path = sizes[chunk], paths[chunk]
        if path.exists() and torch.load(path, weights_only=True)["x"].shape[0] == size:
            reused += 1
        else:  # missing, or a chunk of another size (batch_size changed): (re)generate
            z, y = chunk_noise(seed, chunk, size, shape, model.num_classes)
            x = solve(model, z, y, nfe, solver)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"x": x}, tmp)
            tmp.replace(path)  # atomic: a killed run never leaves a half chunk
        bar.update(size)
    bar.close()
    barrier()
    zs, xs, ys = [], [], []
    for chunk in range(n_chunks):
        z, y = chunk_noise(seed, chunk, sizes[chunk], shape, model.num_classes)
        zs.append(z)
        xs.append(torch.load(paths[chunk], weights_only=True)["x"])
        if y is not None:
            ys.append(y)
    return torch.cat(zs), torch.cat(xs), (torch.cat(ys) if ys else None), reused


def couplings_on_ranks(teacher_dir: Path | str, count: int, batch_size: int, nfe: int, solver: str, seed: int,
                       work_dir: Path | str, distributed) -> int:
    """Solve every chunk of :func:`generate_couplings` into `work_dir` on the ranks of `distributed` (its
    processes_per_node x nodes, through the one launcher); the chunk files, named by index, are the merge, so the
    caller's own `generate_couplings` then only reads them: the same pairs as one process. With several nodes,
    `work_dir` must be on a filesystem every node sees (as checkpoints are). Returns the number of chunk files an
    earlier, interrupted run had left (kept when their size matches)."""
    work_dir = Path(work_dir)
    found = len(list(work_dir.glob("chunk*.pt")))
    args = {"teacher_dir": str(Path(teacher_dir).resolve()), "count": count, "batch_size": batch_size, "nfe": nfe,
            "solver": solver, "seed": seed, "work_dir": str(work_dir.resolve())}
    launch_worker({"call": task_ref(solve_couplings_here), "job": args}, work_dir, distributed.processes_per_node,
                  distributed.nodes, distributed.timeout_s, "couplings ranks")
    return found


def solve_couplings_here(args: dict[str, Any]) -> None:
    """One launched rank's share of :func:`couplings_on_ranks`."""
    teacher = load_denoiser(args["teacher_dir"])
    set_torch_threads(teacher.spec, sampling=True)
    generate_couplings(teacher, args["count"], args["batch_size"], args["nfe"], args["solver"], args["seed"],
                       args["work_dir"], progress=world_info()[0] == 0)


def write_coupling_shards(out_dir: Path | str, z: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor],
                          samples_per_shard: int, samples_per_record: int) -> list[str]:
    """Write the couplings as WebDataset tars `couplings-%06d.tar` (records of blocks: z.npy, x.npy, cls.npy) and
    return the shard names."""
    arrays = {"z": z.numpy().astype(np.float32), "x": x.numpy().astype(np.float32),
              "cls": y.numpy().astype(np.int64) if y is not None else None}
    return write_array_shards(out_dir, COUPLING_PREFIX, arrays, samples_per_shard=samples_per_shard,
                              samples_per_record=samples_per_record)


def read_couplings(directory: Path | str) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """All couplings of the shards in `directory`, in order: (z, x, labels or None)."""
    paths = sorted(Path(directory).glob(f"{COUPLING_PREFIX}-*.tar"))
    arrays = read_array_shards(paths) if paths else {}
    if "z" not in arrays or "x" not in arrays or len(arrays["z"]) != len(arrays["x"]):
        raise DataError(f"coupling shards in {directory} hold no complete (z, x) records")
    y = torch.from_numpy(arrays["cls"]).long() if "cls" in arrays else None
    return torch.from_numpy(arrays["z"]), torch.from_numpy(arrays["x"]), y


def coupling_task(args: dict[str, Any], config: TrainConfig, world_size: int, threads: int = 0) -> TrainingTask:
    """A velocity model (`args["spec"]`, initialised from the weights file `args["init"]`) trained on the couplings
    in `args["couplings"]` with `args["objective"]`: {"name": "reflow", "p_uncond", "num_classes"} or
    {"name": "euler_distill", "nfe"}."""
    spec, objective = args["spec"], args["objective"]
    set_torch_threads(spec, threads)
    model = build_denoiser(spec)
    model.load_state_dict(load_weights(args["init"]))
    if objective["name"] == "reflow":
        loss_fn = ReflowObjective(objective["p_uncond"], objective["num_classes"])
    else:
        loss_fn = EulerDistillObjective(objective["nfe"])
    z, x, y = read_couplings(args["couplings"])
    batches = shuffled_batches({"z": z, "x": x, "y": y}, config.micro_batch_size(world_size),
                               rank_seed(config.seed), what="couplings")
    return TrainingTask(model, loss_fn, batches, fingerprint={"spec": spec, "objective": objective})


# ---------------------------------------------------------------- the reflow stage's rounds

DIAGNOSTIC_PAIRS = 512  # at most this many noise draws / couplings for straightness and coupling diagnostics
STRAIGHTNESS_STEPS = 32


def teacher_identity(teacher_dir: Path | str) -> dict:
    """What identifies the teacher a coupling came from: its weights digest (its MLflow run is in the lineage)."""
    return {"path": "models/teacher", "weights_md5": file_md5(Path(teacher_dir) / WEIGHTS_FILE)}


def check_couplings_teacher(coupling_manifest: dict, current: dict, couplings_rel: str) -> None:
    """The couplings' manifest must name the current teacher (its weights digest): DataError otherwise."""
    recorded = coupling_manifest.get("teacher") or {}
    for key in ("weights_md5",):
        if recorded.get(key) != current[key]:
            raise DataError(f"{couplings_rel} was generated from a different teacher ({key} {recorded.get(key)} in "
                            f"its manifest, models/teacher has {current[key]}); rerun `dvc repro couplings`")


def path_straightness(model: LoadedModel, noise: torch.Tensor, cond: Optional[torch.Tensor]) -> float:
    """Mean straightness of the model's paths, by the evaluate stage's one definition."""
    return evaluated_straightness(model, noise, cond, STRAIGHTNESS_STEPS)[0].value


def round_report(model: LoadedModel, noise: torch.Tensor, cond: Optional[torch.Tensor], coupling, outcome) -> dict:
    """A reflow round's metrics: training loss, straightness of the model's paths, coupling diagnostics."""
    z, x, y = (c[:DIAGNOSTIC_PAIRS] if c is not None else None for c in coupling)
    velocity = lambda x_t, t: model.denoiser(x_t, t, y, target="v")  # noqa: E731
    diagnostics = coupling_diagnostics(z, x, velocity, generator=torch.Generator().manual_seed(0))
    return {"final_loss": outcome.final_loss, "steps": outcome.steps, "resumed_from_step": outcome.resumed_from,
            "straightness": path_straightness(model, noise, cond),
            **{f"coupling_{k}": diagnostics[k] for k in ("reflow_loss", "fixed_point", "transport_cost",
                                                         "assignment_cost", "cost_over_assignment")}}


def regenerate_couplings(model: LoadedModel, coupling_manifest: dict, work_dir: Path) -> Path:
    """A fresh coupling through `model` with the couplings stage's count, solver and NFE (seed shifted: fresh
    noise), written as coupling shards into `work_dir`/shards; returns that directory."""
    count = coupling_manifest["count"]
    z, x, y, _ = generate_couplings(model, count, min(count, 2000), coupling_manifest["nfe"],
                                    coupling_manifest["solver"], coupling_manifest["seed"] + 7919, work_dir / "chunks",
                                    progress=False)
    shards = work_dir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    write_coupling_shards(shards, z, x, y, samples_per_shard=count, samples_per_record=256)
    return shards


def train_reflow(teacher: LoadedModel, spec: dict, couplings_dir: Path, coupling_manifest: dict, p: ReflowParams,
                 root: Path, out_dir: Path, open_child, tracking_uri: Optional[str] = None,
                 distributed=None) -> tuple[Path, dict, dict]:
    """k rounds of rectified flow from the teacher's weights, then (reflow.distill_nfe > 0) the distillation into
    that many Euler steps; every round and the distillation in a child run `open_child(name, tags)` (a context
    manager yielding an object with `run_id` and `log_metrics`). Checkpoints under `root`; the k-RF model is saved
    to `out_dir`/rectified when distilled.

    Returns (weights file of the final model, its spec, {"metrics", "rounds", "distill"}); rounds and distill carry
    their child run's "mlflow_run_id"."""
    coupling = read_couplings(couplings_dir)
    if len(coupling[0]) < p.batch_size:
        raise DataError(f"the couplings hold {len(coupling[0])} pairs, fewer than reflow.batch_size={p.batch_size}")
    g = torch.Generator().manual_seed(p.seed + 12345)  # diagnostics noise, disjoint from the couplings' seeds
    # No more diagnostic paths than couplings: a small CPU run on images otherwise spends minutes on 32-step
    # straightness solves of 512 images.
    n_diagnostic = min(DIAGNOSTIC_PAIRS, len(coupling[0]))
    noise = torch.randn((n_diagnostic, *spec["data_shape"]), generator=g)
    cond = torch.arange(n_diagnostic) % spec["num_classes"] if spec["num_classes"] else None
    metrics: dict = {"teacher_straightness": path_straightness(teacher, noise, cond),
                     "couplings_count": len(coupling[0]), "rounds": p.rounds}
    objective = {"name": "reflow", "p_uncond": p.p_uncond if spec["num_classes"] is not None else 0.0,
                 "num_classes": spec["num_classes"]}
    weights, rounds, model = teacher.directory / WEIGHTS_FILE, [], teacher
    for round_no in range(1, p.rounds + 1):
        work = root / f"round{round_no}"
        if round_no > 1:  # k-rectified flow: re-pair fresh noise through the previous round's model
            couplings_dir = regenerate_couplings(model, coupling_manifest, work / "couplings")
            coupling = read_couplings(couplings_dir)
        with open_child(f"reflow-round{round_no}", {"reflow.round": round_no, "reflow.parent_stage": "reflow"}) as child:
            job = training_job(coupling_task, {"spec": spec, "init": str(weights), "objective": objective,
                                            "couplings": str(couplings_dir)}, p, p.train_config(),
                               work / "ckpt", work / "export.pt", child.run_id, tracking_uri, distributed)
            outcome = run_job(job, log_fn=child.log_metrics)
            weights = Path(job.export)
            model = model_from_weights(spec, weights, out_dir)
            report = round_report(model, noise, cond, coupling, outcome)
            child.log_metrics(report)
        metrics.update({f"round{round_no}_{k}": v for k, v in report.items()})
        rounds.append({"round": round_no, "mlflow_run_id": child.run_id, **report})
    metrics["straightness"] = metrics[f"round{p.rounds}_straightness"]
    metrics["straightness_ratio"] = metrics["straightness"] / max(metrics["teacher_straightness"], 1e-12)
    if not p.distill_nfe:
        return weights, spec, {"metrics": metrics, "rounds": rounds, "distill": None}

    save_denoiser(out_dir / "rectified", load_weights(weights), spec)  # the k-RF model before distillation
    # Unguided like the k-RF model (student_spec): the coupling already carries a guided teacher's guidance.
    distill_spec = {**spec, "objective": "reflow_distill", "sampler": {**spec["sampler"], "steps": p.distill_nfe}}
    work = root / f"distill{p.distill_nfe}"  # another step count is another run, not a resume
    with open_child(f"reflow-distill-{p.distill_nfe}-step", {"reflow.distill_nfe": p.distill_nfe,
                                                             "reflow.parent_stage": "reflow"}) as child:
        job = training_job(coupling_task, {"spec": distill_spec, "init": str(weights),
                                        "objective": {"name": "euler_distill", "nfe": p.distill_nfe},
                                        "couplings": str(couplings_dir)}, p, p.train_config(steps=p.distill_steps),
                           work / "ckpt", work / "export.pt", child.run_id, tracking_uri, distributed)
        outcome = run_job(job, log_fn=child.log_metrics)
        distilled = model_from_weights(distill_spec, job.export, out_dir)
        distill = {"final_loss": outcome.final_loss, "steps": outcome.steps,
                   "straightness": path_straightness(distilled, noise, cond)}
        child.log_metrics(distill)
    metrics.update({f"distill_{k}": v for k, v in distill.items()})
    metrics["distill_nfe"] = p.distill_nfe
    return Path(job.export), distill_spec, {"metrics": metrics, "rounds": rounds, "distill": {
        "nfe": p.distill_nfe, "mlflow_run_id": child.run_id, "rectified_model": "rectified/", **distill}}
