"""Loader throughput: WebDataset shards vs the same data as an in-memory tensor, in one run.

    python benchmarks/bench_loader.py [--seconds 5]

2-D checkerboard at batch 1024 and digits (8x8 images) at batch 128. Reports samples/s of each and the ratio
shards / memory; writes benchmarks/results/loader.json.
"""
from __future__ import annotations

import sys

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from components.config import DataParams
from components.data.loader import infinite_batches, make_loader
from components.data.shards import read_split, write_shards
from components.data.sources import load_source
from components.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def rate(batches, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    for batch in batches:
        n += len(batch["x"])
        if time.perf_counter() - start > seconds:
            break
    return n / (time.perf_counter() - start)


def memory_batches(x: torch.Tensor, y, batch_size: int):
    g = torch.Generator().manual_seed(0)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield {"x": x[idx], "y": None if y is None else y[idx]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    args = ap.parse_args()
    results = {}
    for label, params, batch in (("toy2d_checkerboard", DataParams(n_samples=20000), 1024),
                                 ("digits", DataParams(source="digits"), 128)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            manifest = write_shards(load_source(params), out, val_fraction=0.2, samples_per_shard=2000,
                                    min_shards=4, seed=0, progress=False)
            write_json(out / "manifest.json", manifest)
            x, y = read_split(out, "train")
            mem = rate(memory_batches(torch.from_numpy(x), None if y is None else torch.from_numpy(y), batch),
                       args.seconds)
            row = {"batch_size": batch, "memory_samples_per_s": mem}
            for workers in (0, 1, 2):
                loader = make_loader(out, "train", batch, shuffle=True, num_workers=workers)
                r = rate(infinite_batches(loader), args.seconds)
                row[f"shards_w{workers}_samples_per_s"] = r
                row[f"ratio_w{workers}"] = r / mem
            results[label] = row
            print(f"{label:20s} batch {batch:5d}: memory {mem:12,.0f}/s | " + " | ".join(
                f"shards w{w} {row[f'shards_w{w}_samples_per_s']:9,.0f}/s ({row[f'ratio_w{w}']:.4f}x)" for w in (0, 1, 2)))
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "loader.json", results)


if __name__ == "__main__":
    main()
