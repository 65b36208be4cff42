"""`shard` stage: read the configured data source and write WebDataset shards + manifest to data/shards/."""
from __future__ import annotations

from prefect import flow

from components.data.shards import write_shards
from components.data.sources import load_source
from flows.stage import StageContext, StageSpec, run_stage_in_flow

SPEC = StageSpec(name="shard", output="data/shards", sections=("data", "shard"))


def build_shards(ctx: StageContext) -> dict:
    data = load_source(ctx.params.data)
    p = ctx.params.shard
    manifest = write_shards(data, ctx.out_dir, val_fraction=p.val_fraction, samples_per_shard=p.samples_per_shard,
                            min_shards=p.min_shards, seed=p.seed,
                            samples_per_record=p.samples_per_record)
    ctx.manifest.update(manifest)
    splits = manifest["splits"]
    return {
        "train_count": splits["train"]["count"],
        "val_count": splits["val"]["count"],
        "train_shards": len(splits["train"]["shards"]),
        "val_shards": len(splits["val"]["shards"]),
        "sigma_data": manifest["sigma_data"],
    }


@flow(name="shard", description="Shard the configured data source into WebDataset tars (data/shards/).")
def flow_fn():
    return run_stage_in_flow(SPEC, build_shards)
