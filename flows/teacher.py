"""`teacher` stage: train the teacher denoiser on data/shards with the one Trainer (DeepSpeed); write
models/teacher/ (EMA weights, model.json, a sample plot, manifest). Checkpoints live in checkpoints/teacher/
<fingerprint>/ outside the DVC output, so a crashed or interrupted run resumes where it stopped."""
from __future__ import annotations

import json
import sys
import time

import torch
from prefect import flow

from components.data.shards import read_shard_manifest, read_split
from components.errors import UserError
from components.evaluation.plots import image_grid, scatter_grid
from components.models.store import SPEC_FILE, WEIGHTS_FILE, load_denoiser
from components.training.denoiser_training import objective_config, run_fingerprint, teacher_spec, train_denoiser
from components.training.distributed import launch_ranks
from components.training.trainer import CheckpointMismatchError, NonFiniteLossError
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="teacher", output="models/teacher", sections=("data", "model", "teacher"))


def train_teacher(ctx: StageContext) -> dict:
    shards = ctx.path("data/shards")
    manifest = read_shard_manifest(shards)
    p = ctx.params.teacher
    spec = teacher_spec(manifest, ctx.params.model, p)
    objective = objective_config(spec, p)
    train = p.trainer_kwargs()
    resume_key = {k: v for k, v in train.items() if k not in ("steps", "checkpoint_every", "log_every")}
    checkpoint_dir = ctx.path(f"checkpoints/teacher/{run_fingerprint(spec, objective, manifest['digest'], resume_key)}")
    export = ctx.out_dir / WEIGHTS_FILE
    ctx.run.set_tags({"checkpoint_dir": checkpoint_dir.relative_to(ctx.repo)})

    ranks = ctx.params.distributed.world_size
    started = time.time()
    try:
        if ranks == 1:
            result, resumed_from = train_denoiser(spec, objective, shards, train, checkpoint_dir, export,
                                                  log_fn=ctx.log_metrics, torch_threads=p.torch_threads)
            steps, final_loss = result.steps, result.final_loss
        else:
            steps, final_loss, resumed_from = _train_multiprocess(ctx, spec, objective, shards, train,
                                                                  checkpoint_dir, export)
    except (CheckpointMismatchError, NonFiniteLossError) as e:
        raise UserError(str(e)) from None
    train_seconds = time.time() - started
    (ctx.out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")

    plot = _plot_samples(ctx, shards, manifest, p.plot_samples, p.seed)
    ctx.run.log_artifact(plot)
    ctx.manifest.update({"model": spec, "objective": objective, "checkpoint_dir": str(checkpoint_dir.relative_to(ctx.repo))})
    return {"steps": steps, "final_loss": final_loss, "train_seconds": round(train_seconds, 2),
            "steps_per_sec": round((steps - resumed_from) / max(train_seconds, 1e-9), 2), "processes": ranks,
            "resumed_from_step": resumed_from}


def _train_multiprocess(ctx, spec, objective, shards, train, checkpoint_dir, export) -> tuple[int, float, int]:
    job_file, result_file = ctx.out_dir / "job.json", ctx.out_dir / "train_result.json"
    job = {"spec": spec, "objective": objective, "shards": str(shards), "train": train,
           "checkpoint_dir": str(checkpoint_dir), "export": str(export), "result": str(result_file),
           "tracking_uri": ctx.run.tracking_uri, "run_id": ctx.run.run_id, "torch_threads": ctx.params.teacher.torch_threads}
    job_file.write_text(json.dumps(job))
    d = ctx.params.distributed
    code = launch_ranks(d.processes_per_node, ["-m", "flows.train_worker", str(job_file)], nodes=d.nodes,
                        timeout_s=d.timeout_s)
    if code != 0:
        raise RuntimeError(f"training ranks exited with code {code} (see their output above)")
    result = json.loads(result_file.read_text())
    job_file.unlink()
    result_file.unlink()
    return result["steps"], result["final_loss"], result["resumed_from"]


def _plot_samples(ctx, shards, manifest, n: int, seed: int):
    model = load_denoiser(ctx.out_dir)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *manifest["shape"], generator=gen)
    cond = None
    if model.num_classes is not None:
        cond = torch.arange(n) % model.num_classes
    result = model.sample(noise, cond=cond)
    path = ctx.out_dir / "samples.png"
    if manifest["kind"] == "image":
        image_grid(result.x[:64], path, nrow=8)
    else:
        real, _ = read_split(shards, "val", limit=n)
        scatter_grid({"teacher": {result.nfe: result.x}}, torch.from_numpy(real), path)
    return path


@flow(name="teacher", description="Train the teacher diffusion model (DeepSpeed) on data/shards -> models/teacher/.")
def flow_fn():
    return run_stage_in_flow(SPEC, train_teacher)


if __name__ == "__main__":  # allows `python -m flows.teacher` as well
    sys.exit(0 if flow_fn(return_state=True).is_completed() else 1)
