"""Where a training step's time goes inside the teacher stage's own code path, vs a plain loop on the same data.

The stage path is what `train_denoiser` runs: the WebDataset loader (tar read, npy decode, shuffle buffer,
rebatch), the one Trainer (DeepSpeed engine, AdamW, clipping, EMA, loss all-reduce/metrics, progress bar, log
callback, checkpoints), with the default params.yaml's teacher settings and the default data. Each part is timed by
wrapping the very functions the Trainer calls (so the numbers add up to the step time, minus "other").
The plain loop: the same network, objective, batches (materialised in memory first), AdamW and clipping, nothing
else. Times are this thread's CPU time (`time.thread_time`; the MLP trains on one torch thread and the loader
has no workers), so other processes on a shared machine do not count; stage and plain runs alternate over
`--repeats` rounds; the ratio is plain time / stage time per round, reported as median with min and max.

    .venv/bin/python benchmarks/bench_stage_step.py              # 500 steps x 3 repeats
    .venv/bin/python benchmarks/bench_stage_step.py --steps 200  # quicker

Writes benchmarks/results/bench_stage_step.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import components.training.trainer as trainer_module  # noqa: E402
from components.config import load_params  # noqa: E402
from components.data.loader import infinite_batches, make_loader  # noqa: E402
from components.data.shards import read_shard_manifest, write_shards  # noqa: E402
from components.data.sources import load_source  # noqa: E402
from components.io import write_json  # noqa: E402
from components.models.store import build_denoiser  # noqa: E402
from components.objectives.denoising import make_objective  # noqa: E402
from components.training.denoiser_training import objective_config, set_torch_threads, teacher_spec  # noqa: E402
from components.training.trainer import TrainConfig, Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results/bench_stage_step.json"


class Clock:
    """Cumulative seconds per named part; `wrap` times every call of a function."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.thread_time() - start
        return timed

    def stream(self, name: str, iterator):
        iterator = iter(iterator)
        while True:
            start = time.thread_time()
            item = next(iterator)
            self.seconds[name] += time.thread_time() - start
            yield item


def stage_round(spec, objective, shards: Path, train: dict, steps: int, workdir: Path) -> dict:
    """One teacher training run through the stage's components, every part of the step timed."""
    clock = Clock()
    torch.manual_seed(0)
    denoiser = build_denoiser(spec)
    loss_fn = make_objective(objective["name"], **objective["kwargs"])
    config = TrainConfig(**{**train, "steps": steps, "progress_bar": True})
    loader = make_loader(shards, "train", config.micro_batch_size(1), shuffle=True, seed=config.seed, drop_last=True)
    logged = []
    trainer = Trainer(denoiser, clock.wrap("forward (loss_fn)", loss_fn), config, workdir,
                      log_fn=clock.wrap("log callback", lambda m, s: logged.append(s)))
    trainer._to_device = clock.wrap("host-to-device", trainer._to_device)
    trainer._global_loss = clock.wrap("loss all-reduce + metrics", trainer._global_loss)
    trainer.save_checkpoint = clock.wrap("checkpoints", trainer.save_checkpoint)
    trainer.engine.backward = clock.wrap("backward", trainer.engine.backward)
    trainer.engine.step = clock.wrap("optimizer (DeepSpeed step)", trainer.engine.step)
    trainer.ema.update = clock.wrap("EMA", trainer.ema.update)
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = clock.wrap("gradient clipping", clip)
    bar_update = trainer_module.tqdm.update
    trainer_module.tqdm.update = clock.wrap("progress bar", bar_update)
    try:
        start = time.thread_time()
        trainer.fit(clock.stream("loader + decode", infinite_batches(loader)))
        total = time.thread_time() - start
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        trainer_module.tqdm.update = bar_update
    parts = {name: 1000 * s / steps for name, s in clock.seconds.items()}
    parts["other (fit loop, resume check)"] = 1000 * total / steps - sum(parts.values())
    return {"step_ms": 1000 * total / steps, "parts_ms": parts}


def plain_round(spec, objective, batches: list[dict], train: dict) -> float:
    """ms per step of forward + backward + clipping + AdamW on in-memory batches."""
    torch.manual_seed(0)
    model = build_denoiser(spec)
    loss_fn = make_objective(objective["name"], **objective["kwargs"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    start = time.thread_time()
    for batch in batches:
        loss, _ = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
        optimizer.step()
    return 1000 * (time.thread_time() - start) / len(batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    params = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        shards.mkdir()
        s = params.shard
        manifest = write_shards(load_source(params.data), shards, val_fraction=s.val_fraction,
                                samples_per_shard=s.samples_per_shard, min_shards=s.min_shards, seed=s.seed,
                                samples_per_record=s.samples_per_record, progress=False)
        write_json(shards / "manifest.json", manifest)
        manifest = read_shard_manifest(shards)
        spec = teacher_spec(manifest, params.model, params.teacher)
        objective = objective_config(spec, params.teacher)
        train = params.teacher.train_config().model_dump()
        threads = set_torch_threads(spec, params.teacher.torch_threads)
        micro = TrainConfig(**train).micro_batch_size(1)
        stream = infinite_batches(make_loader(shards, "train", micro, shuffle=True, seed=train["seed"],
                                              drop_last=True))
        batches = [next(stream) for _ in range(args.steps)]  # the same data, already in memory

        rounds = []
        for r in range(args.repeats):
            plain_ms = plain_round(spec, objective, batches, train)
            stage = stage_round(spec, objective, shards, train, args.steps, tmp / f"ck{r}")
            rounds.append({"plain_step_ms": plain_ms, **stage, "ratio": plain_ms / stage["step_ms"]})
            print(f"round {r}: plain {plain_ms:.2f} ms, stage {stage['step_ms']:.2f} ms, "
                  f"ratio {plain_ms / stage['step_ms']:.3f}", file=sys.stderr)
    ratios = [r["ratio"] for r in rounds]
    parts = {k: statistics.median(r["parts_ms"][k] for r in rounds) for k in rounds[0]["parts_ms"]}
    result = {
        "what": "teacher step inside the stage code path vs a plain loop on the same data (default params)",
        "model": spec["network"], "batch_size": micro, "steps": args.steps, "torch_threads": threads,
        "machine": platform.platform(), "cpus": torch.get_num_threads(),
        "ratio_plain_over_stage": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "stage_step_ms_median": statistics.median(r["step_ms"] for r in rounds),
        "plain_step_ms_median": statistics.median(r["plain_step_ms"] for r in rounds),
        "parts_ms_median": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        "rounds": rounds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
