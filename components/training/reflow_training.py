"""Reflow recipe: teacher ODE couplings (generated in resumable chunks, stored as WebDataset shards), and the one
Trainer on those couplings with the reflow (or one-step distillation) loss, initialised from a velocity model.

Couplings: noise z ~ N(0, I) drawn chunk by chunk from fixed seeds (chunk i always gets the same z, whatever was
resumed), x = ODE solve of the model from t = 1 (z) to t = 0. Each finished chunk is saved to a work dir outside
the DVC output, so an interrupted run regenerates only the missing chunks.
"""
from __future__ import annotations

import io
import math
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from components.data.memory import shuffled_batches
from components.errors import DataError
from components.models.store import LoadedModel, build_denoiser
from components.training.denoiser_training import set_torch_threads
from components.training.distributed import barrier, rank_share
from components.training.trainer import Trainer, TrainConfig, TrainResult

COUPLING_KEYS = ("z.npy", "x.npy", "cls.npy")
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


def loaded_from_state(spec: dict[str, Any], state: dict[str, torch.Tensor], directory: Path) -> LoadedModel:
    """A LoadedModel (eval mode) built from a spec and weights in memory."""
    denoiser = build_denoiser(spec)
    denoiser.load_state_dict(state)
    denoiser.eval()
    return LoadedModel(denoiser, spec, Path(directory))


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


def write_coupling_shards(out_dir: Path | str, z: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor],
                          samples_per_shard: int, samples_per_record: int) -> list[str]:
    """Write the pairs as WebDataset tars `pairs-%06d.tar` (records of blocks: z.npy, x.npy, cls.npy) and return
    the shard names. Byte-reproducible (fixed mtime), like the data shards."""
    import webdataset as wds

    out_dir = Path(out_dir)
    z_np, x_np = z.numpy().astype(np.float32), x.numpy().astype(np.float32)
    y_np = y.numpy().astype(np.int64) if y is not None else None
    names = []
    for shard_no, start in enumerate(range(0, len(z_np), samples_per_shard)):
        name = f"pairs-{shard_no:06d}.tar"
        stop = min(start + samples_per_shard, len(z_np))
        with wds.TarWriter(str(out_dir / name), mtime=0.0) as sink:
            for r in range(start, stop, samples_per_record):
                block = slice(r, min(r + samples_per_record, stop))
                record = {"__key__": f"{r:08d}", "z.npy": np.ascontiguousarray(z_np[block]),
                          "x.npy": np.ascontiguousarray(x_np[block])}
                if y_np is not None:
                    record["cls.npy"] = y_np[block]
                sink.write(record)
        names.append(name)
    return names


def read_couplings(directory: Path | str, shards: list[str]) -> tuple[torch.Tensor, torch.Tensor,
                                                                      Optional[torch.Tensor]]:
    """All pairs of the listed coupling shards, in order: (z, x, labels or None)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in COUPLING_KEYS}
    for name in shards:
        path = Path(directory) / name
        try:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key = next((k for k in COUPLING_KEYS if member.name.endswith("." + k)), None)
                    if key:
                        parts[key].append(np.load(io.BytesIO(tar.extractfile(member).read())))
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(f"corrupt or missing coupling shard {path}: {e.__class__.__name__}: {e}") from None
    if not parts["z.npy"] or len(parts["z.npy"]) != len(parts["x.npy"]):
        raise DataError(f"coupling shards in {directory} hold no complete (z, x) records")
    z, x = (torch.from_numpy(np.concatenate(parts[k])) for k in ("z.npy", "x.npy"))
    y = torch.from_numpy(np.concatenate(parts["cls.npy"])).long() if parts["cls.npy"] else None
    return z, x, y


def pair_batches(z: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor], batch_size: int,
                 seed: int) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches {"z", "x", "y"} of the coupling (seeded: a resumed run sees the same batches)."""
    return shuffled_batches({"z": z, "x": x, "y": y}, batch_size, seed, what="coupling pairs")


def train_on_coupling(spec: dict[str, Any], init_state: dict[str, torch.Tensor],
                      loss_fn: Callable, coupling: tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                      train: dict[str, Any], checkpoint_dir: Path | str, export_path: Path | str,
                      log_fn: Optional[Callable[[dict, int], None]] = None, progress: bool = True,
                      torch_threads: int = 0, fingerprint: Optional[dict] = None) -> tuple[TrainResult, int]:
    """Train a velocity model (spec, initialised from `init_state`) with `loss_fn` on a coupling using the one
    Trainer; resume from `checkpoint_dir`; export the EMA weights to `export_path`.

    Returns the Trainer's result and the step it resumed from (0 for a fresh start)."""
    set_torch_threads(spec, torch_threads)
    model = build_denoiser(spec)
    model.load_state_dict(init_state)
    config = TrainConfig(**train, progress_bar=progress)
    z, x, y = coupling
    trainer = Trainer(model, loss_fn, config, checkpoint_dir, log_fn=log_fn, fingerprint=fingerprint or {"spec": spec})
    found = trainer.latest_checkpoint()
    resumed_from = int(found[1]["step"]) if found else 0
    result = trainer.fit(pair_batches(z, x, y, config.micro_batch_size(trainer.world_size), config.seed))
    trainer.export(export_path)
    return result, resumed_from
