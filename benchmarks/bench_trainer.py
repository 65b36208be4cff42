"""Trainer overhead: steps/s of the DeepSpeed Trainer vs a plain PyTorch loop, same model/data/optimizer/batch.

Both loops do the same work per step: forward, backward, gradient clipping, AdamW (torch), EMA update.
Rounds alternate (plain, trainer, plain, trainer, ...) so load from other processes on a shared machine hits
both alike; the reported rate is the median over rounds. Writes benchmarks/results/bench_trainer.json.

    .venv/bin/python benchmarks/bench_trainer.py            # MLP 2-D, batch 1024 (+ UNet 8x8, batch 128)
    .venv/bin/python benchmarks/bench_trainer.py --quick    # fewer steps
    .venv/bin/python benchmarks/bench_trainer.py --profile  # where the Trainer's extra time goes (cProfile)
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.models import build_model  # noqa: E402
from components.training import EMA, TrainConfig, Trainer  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def denoising_loss(model: Callable, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """A plain denoising MSE (log-normal noise level), enough to exercise a realistic step."""
    x0 = batch["x"]
    sigma = torch.exp(torch.randn(x0.shape[0], device=x0.device) * 1.2 - 1.2)
    sigma_b = sigma.view(-1, *([1] * (x0.ndim - 1)))
    noisy = x0 + sigma_b * torch.randn_like(x0)
    return ((model(noisy, sigma.log() / 4, batch.get("y")) - x0) ** 2).mean(), {}


def make_batches(shape: tuple[int, ...], batch_size: int, pool_batches: int = 16, device: str = "cpu"):
    """An endless, deterministic stream cycling over a fixed pool of batches (no data-loading cost)."""
    generator = torch.Generator().manual_seed(0)
    pool = [{"x": torch.randn(batch_size, *shape, generator=generator).to(device), "y": None}
            for _ in range(pool_batches)]
    index = 0
    while True:
        yield pool[index % pool_batches]
        index += 1


def plain_rounds(model: nn.Module, config: TrainConfig, batches, round_steps: int, rounds: int,
                 device: str, use_ema: bool = True) -> list[float]:
    """Reference loop written by hand; returns steps/s per round."""
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.adam_betas, eps=1e-8,
                                  weight_decay=config.weight_decay)
    ema = EMA(model, config.ema_decay)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(round_steps):
            loss, _ = denoising_loss(model, next(batches))
            loss_value = float(loss.detach())  # the Trainer checks finiteness every step: same host sync here
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if use_ema:
                ema.update(model)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(round_steps / (time.perf_counter() - start))
        assert loss_value == loss_value
    return rates


def trainer_rounds(trainer: Trainer, batches, round_steps: int) -> float:
    """Train ``round_steps`` more steps with the Trainer; steps/s measured around the loop only."""
    times: dict[int, float] = {}
    trainer.log_fn = lambda metrics, step: times.__setitem__(step, time.perf_counter())
    first = trainer.step
    trainer.config.steps = first + round_steps
    trainer.config.log_every = round_steps
    start = time.perf_counter()
    trainer.fit(batches, skip_consumed_batches=False)
    # The end-of-fit checkpoint happens after the last log call: excluded from the rate.
    return round_steps / (times[first + round_steps] - start)


def bench(name: str, model_factory: Callable[[], nn.Module], shape: tuple[int, ...], batch_size: int,
          round_steps: int, rounds: int, device: str, profile: bool) -> dict:
    torch.manual_seed(0)
    model = model_factory()
    plain_model = copy.deepcopy(model)
    config = TrainConfig(steps=1, batch_size=batch_size, lr=1e-3, grad_clip=1.0, ema_decay=0.999,
                         checkpoint_every=0, log_every=1, progress_bar=False, precision="fp32")
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        trainer = Trainer(model, denoising_loss, config, checkpoint_dir)
        trainer_batches = make_batches(shape, batch_size, device=device)
        plain_batches = make_batches(shape, batch_size, device=device)
        # Warm-up both (allocator, thread pools, first-step lazy init).
        plain_rounds(plain_model, config, plain_batches, max(5, round_steps // 5), 1, device)
        trainer_rounds(trainer, trainer_batches, max(5, round_steps // 5))

        plain, ours = [], []
        for _ in range(rounds):
            plain += plain_rounds(plain_model, config, plain_batches, round_steps, 1, device)
            ours.append(trainer_rounds(trainer, trainer_batches, round_steps))
        plain_no_ema = plain_rounds(copy.deepcopy(plain_model), config, plain_batches, round_steps, 1, device,
                                    use_ema=False)
        profile_text = None
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            trainer_rounds(trainer, trainer_batches, round_steps)
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(25)
            profile_text = stream.getvalue()

    result = {
        "name": name,
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "round_steps": round_steps,
        "rounds": rounds,
        "plain_steps_per_sec": statistics.median(plain),
        "trainer_steps_per_sec": statistics.median(ours),
        "plain_no_ema_steps_per_sec": plain_no_ema[0],
        "plain_rounds": plain,
        "trainer_rounds": ours,
    }
    # Adjacent rounds see similar background load: the median of per-pair ratios is the robust estimate.
    result["ratio"] = statistics.median(o / p for o, p in zip(ours, plain))
    result["ratio_of_medians"] = result["trainer_steps_per_sec"] / result["plain_steps_per_sec"]
    print(f"{name:>10}: plain {result['plain_steps_per_sec']:8.1f} steps/s | trainer "
          f"{result['trainer_steps_per_sec']:8.1f} steps/s | ratio {result['ratio']:.3f} "
          f"(plain without EMA {result['plain_no_ema_steps_per_sec']:.1f} steps/s)")
    if profile_text:
        print(profile_text)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile one Trainer round")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_trainer.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    scale = 0.25 if args.quick else 1.0

    results = [bench("mlp-2d", lambda: build_model("mlp", data_dim=2, width=256, depth=4), (2,), 1024,
                     max(10, int(60 * scale)), args.rounds, device, args.profile)]
    if not args.skip_unet:
        results.append(bench("unet-8x8", lambda: build_model("unet", image_size=8, in_channels=1, base_channels=32,
                                                              channel_mult=(1, 2), num_res_blocks=1),
                             (1, 8, 8), 128, max(4, int(12 * scale)), args.rounds, device, args.profile))
    payload = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "command": " ".join(sys.argv),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
