"""Consistency multistep sampling: which grid of intermediate noise levels (edm / logsnr / uniform) at each NFE.

The trained consistency model (models/consistency, e.g. from `make demo`) is sampled with multistep consistency
sampling on each grid at each NFE, from `--seeds` noise seeds of n points each (n: the evaluation protocol's
default, 10k fresh held-out points for toy 2-D data), and scored with the evaluation protocol (sw2 as a multiple
of the floor, with its 95% interval). Reported per cell: each seed's ratio and interval, the mean and sd over seeds,
and each seed's sw2 itself with its interval (without the floor's uncertainty, which every cell shares).
At NFE 1 every grid is the same single step [t_max, t_end], so it is left out.

    python benchmarks/bench_consistency_grid.py [--model models/consistency] [--seeds 4] [--nfe 2 4 8 16]

Writes benchmarks/results/consistency_grid.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from components.config import EvaluateParams
from components.data.shards import read_shard_manifest
from components.evaluation import protocol
from components.evaluation.leaderboard import build_reference, load_model
from components.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/consistency")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--nfe", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--grids", nargs="+", default=["edm", "logsnr", "uniform"])
    args = ap.parse_args(argv)
    shards = REPO / args.shards
    model = load_model(REPO / args.model, read_shard_manifest(shards)["shape"])
    reference = build_reference(shards, REPO / "models/featurizer", EvaluateParams(), REPO, print, print)
    metric = protocol.PRIMARY[reference.kind]
    cells = {}
    for nfe in args.nfe:
        for grid in args.grids:
            per_seed = []
            for seed in range(args.seeds):
                noise, cond = protocol.fixed_noise_and_labels(model, reference.n, 100 + seed)
                x, _, _ = protocol.generate(model, protocol.Candidate("consistency", grid), nfe, noise, cond,
                                            200 + seed)
                scores = reference.score(x, cond)
                per_seed.append({"ratio": scores[f"{metric}_ratio"], "ci": scores[f"{metric}_ratio_ci"],
                                 metric: scores[metric], f"{metric}_ci": scores[f"{metric}_ci"]})
            ratios = [s["ratio"] for s in per_seed]
            cells[f"{nfe}/{grid}"] = {"nfe": nfe, "grid": grid, "mean": statistics.mean(ratios),
                                      "sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0, "seeds": per_seed}
            print(f"NFE {nfe:2d} {grid:8s} {metric} ratio mean {statistics.mean(ratios):.2f} "
                  f"sd {cells[f'{nfe}/{grid}']['sd']:.2f} over {args.seeds} seeds; per seed "
                  + " ".join(f"{s['ratio']:.2f} [{s['ci'][0]:.2f},{s['ci'][1]:.2f}]" for s in per_seed)
                  + f"; {metric} itself " + " ".join(f"{s[metric]:.4f} [{s[f'{metric}_ci'][0]:.4f},"
                                                      f"{s[f'{metric}_ci'][1]:.4f}]" for s in per_seed), flush=True)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "consistency_grid.json", {"model": args.model, "metric": f"{metric}_ratio",
                                                    "n": reference.n, "seeds": args.seeds, "cells": cells})
    return 0


if __name__ == "__main__":
    sys.exit(main())
