"""The GPU check behind scripts/gpu_check.sh: throughput and memory of the CIFAR-10 profile's UNet, written as JSON.

Measures, on a synthetic archive in the CIFAR-10 python format (no download) read through the real data path
(load_source -> write_shards -> make_loader):
- images/s of the teacher's UNet (the profile's size, bf16) through the one Trainer (DeepSpeed engine, EMA) vs a
  plain bf16 PyTorch loop (autocast + AdamW) on the same model and batch, and their ratio;
- peak GPU memory of the Trainer with ZeRO 0 and ZeRO 2;
- the step time of each student stage's objective (reflow, euler distillation, progressive, consistency, dpo)
  through the Trainer.
`--tiny` shrinks the UNet, batch and step counts so the whole check runs on CPU in the test suite (fp32 there;
its numbers say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import pickle
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `components`

from components.config import DataParams, ModelParams, TeacherParams  # noqa: E402
from components.data.loader import infinite_batches, make_loader  # noqa: E402
from components.data.shards import read_shard_manifest, write_shards  # noqa: E402
from components.data.sources import load_source  # noqa: E402
from components.io import write_json  # noqa: E402
from components.models.store import build_denoiser  # noqa: E402
from components.objectives.denoising import make_objective  # noqa: E402
from components.training.denoiser_training import objective_config, teacher_spec  # noqa: E402
from components.training.trainer import TrainConfig, Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
             "num_heads": 1, "dropout": 0.0}


def write_synthetic_cifar10(path: Path, per_batch: int, n_test: int, seed: int = 0) -> None:
    """cifar-10-batches-py/{data_batch_1..5, test_batch}: pickled dicts of b"data" uint8 [N, 3072], b"labels"."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
            labels = np.arange(n) % 10
            data = np.clip(rng.normal(25 * labels[:, None], 30, size=(n, 3072)), 0, 255).astype(np.uint8)
            blob = pickle.dumps({b"data": data, b"labels": labels.tolist()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per call of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - start) / steps


def device_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def plain_loop_seconds(spec: dict, objective: dict, batch: dict, lr: float, warmup: int, steps: int) -> float:
    """A plain bf16 PyTorch loop: autocast forward, backward, AdamW, same model and batch as the Trainer."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_denoiser(spec).to(device)
    loss_fn = make_objective(objective["name"], **objective["kwargs"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = device_batch(batch, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss, _ = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return timed_steps(step, warmup, steps)


def trainer_seconds(model: torch.nn.Module, loss_fn, batch: dict, config: TrainConfig, workdir: Path,
                    warmup: int, steps: int) -> tuple[float, float | None]:
    """(seconds per optimizer step, peak GPU memory in GiB or None on CPU) of `model` through the one Trainer."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = config.model_copy(update={"steps": warmup + steps + 1})  # fit() runs until steps: the window is inside
    trainer = Trainer(model, loss_fn, config, workdir)
    dtype = torch.bfloat16 if config.resolved_precision() == "bf16" else None

    def batches():
        cast = {k: (v.to(dtype) if dtype is not None and torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in batch.items()}
        while True:
            yield cast

    pulled: list[float] = []  # when fit() asks for each batch: one optimizer step apart (grad_accum 1)

    def timed(stream):
        for item in stream:
            pulled.append(time.perf_counter())
            yield item

    trainer.fit(timed(batches()))
    synchronize()
    per_step = (pulled[warmup + steps] - pulled[warmup]) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del trainer
    return per_step, peak


def student_losses(spec: dict, teacher: torch.nn.Module, batch: dict) -> dict[str, tuple[Any, Any, dict]]:
    """{stage: (model to train, loss_fn, batch)} built from each stage's own objective class."""
    from components.diffusion.consistency import ConsistencyFunction
    from components.objectives.consistency import ConsistencyObjective, ConsistencyPair
    from components.objectives.dpo import DiffusionDPOObjective
    from components.objectives.progressive import ProgressiveObjective
    from components.objectives.reflow import EulerDistillObjective, ReflowObjective
    from components.preferences.finetune import time_sampler_for

    x = batch["x"]
    pair_batch = {**batch, "z": torch.randn_like(x)}
    out: dict[str, tuple[Any, Any, dict]] = {}
    student = lambda: copy.deepcopy(teacher)  # noqa: E731 - every student starts from the teacher's weights
    out["reflow"] = (student(), ReflowObjective(), pair_batch)
    out["reflow_distill"] = (student(), EulerDistillObjective(steps=2), pair_batch)
    out["progressive"] = (student(), ProgressiveObjective(copy.deepcopy(teacher), teacher.schedule, 8), batch)
    out["consistency"] = (ConsistencyPair(ConsistencyFunction(student(), sigma_min=0.002, sigma_max=80.0)),
                          ConsistencyObjective(teacher=copy.deepcopy(teacher)), batch)
    out["dpo"] = (student(), DiffusionDPOObjective(copy.deepcopy(teacher), beta=1000.0,
                                                   time_sampler=time_sampler_for(spec)),
                  {**batch, "x_loser": torch.flip(x, [0])})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gpu_check.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny UNet, batch and steps (a CPU smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: the profile's 128)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 50)")
    args = parser.parse_args(argv)

    profile = yaml.safe_load((REPO / "profiles/cifar10.yaml").read_text())
    unet = TINY_UNET if args.tiny else profile["model"]["unet"]
    batch_size = args.batch or (4 if args.tiny else int(profile["teacher"]["batch_size"]))
    steps = args.steps or (2 if args.tiny else 50)
    warmup = 1 if args.tiny else 10
    on_gpu = torch.cuda.is_available()
    if args.tiny:
        torch.set_num_threads(1)  # a tiny UNet on a shared CPU: threads only add synchronisation
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
                              "precision": "bf16" if on_gpu else "fp32", "batch": batch_size, "timed_steps": steps,
                              "unet": unet, "torch": torch.__version__}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = tmp / "cifar-10-python.tar.gz"
        write_synthetic_cifar10(archive, per_batch=max(batch_size, 40) if args.tiny else 1000, n_test=20)
        data = load_source(DataParams(source="cifar10", path=str(archive)))
        (tmp / "shards").mkdir()
        manifest = write_shards(data, tmp / "shards", val_fraction=0.2, samples_per_shard=1000, min_shards=2, seed=0,
                                samples_per_record=1, progress=False)
        write_json(tmp / "shards/manifest.json", manifest)
        manifest = read_shard_manifest(tmp / "shards")
        teacher_params = TeacherParams(**{k: v for k, v in profile["teacher"].items()})
        spec = teacher_spec(manifest, ModelParams(kind="unet", unet=unet), teacher_params)
        objective = objective_config(spec, teacher_params)
        batch = next(infinite_batches(make_loader(tmp / "shards", "train", batch_size, drop_last=True)))
        lr = float(profile["teacher"]["lr"])
        result["parameters_M"] = round(sum(p.numel() for p in build_denoiser(spec).parameters()) / 1e6, 2)

        plain = plain_loop_seconds(spec, objective, batch, lr, warmup, steps)
        loss_fn = make_objective(objective["name"], **objective["kwargs"])
        memory: dict[str, float | None] = {}
        trainer_time = None
        for zero in (0, 2):
            torch.manual_seed(0)
            config = TrainConfig(steps=1, batch_size=batch_size, lr=lr, zero_stage=zero, ema_decay=0.9999,
                                 progress_bar=False, warmup_steps=0)
            seconds, peak = trainer_seconds(build_denoiser(spec), loss_fn, batch, config, tmp / f"ck_zero{zero}",
                                            warmup, steps)
            memory[f"zero{zero}_peak_gib"] = None if peak is None else round(peak, 3)
            if zero == 0:
                trainer_time = seconds
        result["teacher"] = {"plain_images_per_s": round(batch_size / plain, 2),
                             "trainer_images_per_s": round(batch_size / trainer_time, 2),
                             "trainer_over_plain": round(plain / trainer_time, 3)}
        result["memory"] = memory

        teacher = build_denoiser(spec)
        stages: dict[str, Any] = {}
        for name, (model, stage_loss, stage_batch) in student_losses(spec, teacher, batch).items():
            config = TrainConfig(steps=1, batch_size=batch_size, lr=1e-4, progress_bar=False, warmup_steps=0)
            try:
                seconds, _ = trainer_seconds(model, stage_loss, stage_batch, config, tmp / f"ck_{name}", warmup, steps)
                stages[name] = {"step_ms": round(1000 * seconds, 2)}
            except Exception as e:  # noqa: BLE001 - one stage's API change must not hide the others' numbers
                stages[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        result["student_stages"] = stages
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
