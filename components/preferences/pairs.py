"""Preference pairs: collect them from a model and a reward, read labelled ones from JSONL, store them as
WebDataset shards (`pairs-%06d.tar` + manifest.json) and read them back.

Collection: for each condition group g (a class label for conditional models, else just a group of seeds), K
samples are drawn from per-sample seeds `seed_base + g * K + j` (noise = randn(data_shape) of that seed), scored,
sorted, and the i-th best is paired with the (i + K/2)-th best; pairs whose score margin is below `min_margin`
are dropped. So every sample is used at most once, and every pair records both seeds and both scores.

A shard record holds a block of pairs: xw.npy, xl.npy [k, ...], sw.npy, sl.npy (scores; NaN for labelled pairs),
seedw.npy, seedl.npy (-1 for labelled pairs) and cls.npy (labels, when conditional).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from components.data.shards import read_array_shards, write_array_shards
from components.errors import DataError
from components.io import read_json, tree_digest, write_json

PAIRS_MANIFEST = "manifest.json"
SEED_BASE = 1_000_000  # pair seeds live in [SEED_BASE * (1 + seed), ...): disjoint from evaluation noise streams


@dataclass
class PairSet:
    """Pairs in model range: winners/losers [P, ...], scores [P] (NaN when labelled), seeds [P] (-1 when labelled)."""

    x_w: Tensor
    x_l: Tensor
    score_w: Tensor
    score_l: Tensor
    seed_w: Tensor
    seed_l: Tensor
    cond: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.x_w.shape[0])

    def subset(self, idx: Tensor) -> "PairSet":
        return PairSet(self.x_w[idx], self.x_l[idx], self.score_w[idx], self.score_l[idx], self.seed_w[idx],
                       self.seed_l[idx], None if self.cond is None else self.cond[idx])

    def split(self, holdout_fraction: float, seed: int) -> tuple["PairSet", "PairSet"]:
        """(train, held-out) by a seeded permutation; held-out gets round(P * fraction) pairs (at least 1)."""
        n_hold = max(1, int(round(len(self) * holdout_fraction)))
        if n_hold >= len(self):
            raise DataError(f"{len(self)} pairs cannot be split with holdout fraction {holdout_fraction}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_hold:]), self.subset(perm[:n_hold])


def seeded_noise(seeds: Tensor | list[int], shape: list[int]) -> Tensor:
    """One noise tensor per seed: row i is randn(shape) drawn from a generator seeded with seeds[i]."""
    gen = torch.Generator()
    rows = []
    for s in [int(s) for s in seeds]:
        gen.manual_seed(s)
        rows.append(torch.randn(shape, generator=gen))
    return torch.stack(rows)


def pair_by_rank(scores: Tensor, min_margin: float) -> tuple[Tensor, Tensor]:
    """Indices (winner, loser) pairing the i-th best with the (i + K/2)-th best, margin >= min_margin (> 0)."""
    order = torch.argsort(scores, descending=True, stable=True)
    half = len(order) // 2
    win, lose = order[:half], order[half:2 * half]
    keep = (scores[win] - scores[lose]) >= max(min_margin, 1e-12)
    return win[keep], lose[keep]


def collect_pairs(model, reward, *, groups: int, k: int, min_margin: float, seed: int,
                  nfe: Optional[int] = None, batch_size: int = 4096) -> PairSet:
    """Sample K per group from `model` (a LoadedModel), score with `reward`, and pair them by rank.

    Conditional models get group g the label g % num_classes. Raises DataError when no pair reaches the margin
    (e.g. a reward that gives every sample the same score).
    """
    if k < 2 or groups < 1:
        raise DataError(f"preferences needs k >= 2 samples per group and >= 1 group, got k={k}, groups={groups}")
    shape = list(model.spec["data_shape"])
    base = SEED_BASE * (1 + seed)
    seeds = torch.arange(groups * k, dtype=torch.int64) + base
    cond = None
    if model.num_classes:
        cond = (torch.arange(groups * k) // k) % model.num_classes
    noise = seeded_noise(seeds, shape)
    xs = []
    for start in range(0, len(noise), batch_size):
        c = None if cond is None else cond[start:start + batch_size]
        xs.append(model.sample(noise[start:start + batch_size], nfe=nfe, cond=c).x)
    x = torch.cat(xs)
    scores = reward(x, cond)
    win_idx, lose_idx = [], []
    for g in range(groups):
        w, l = pair_by_rank(scores[g * k:(g + 1) * k], min_margin)
        win_idx.append(w + g * k)
        lose_idx.append(l + g * k)
    w, l = torch.cat(win_idx), torch.cat(lose_idx)
    if len(w) == 0:
        spread = float(scores.max() - scores.min())
        raise DataError(f"no pair reaches preferences.min_margin={min_margin}: the reward's scores span only "
                        f"{spread:.3g} over {len(scores)} samples (equal scores give no preference)")
    return PairSet(x[w], x[l], scores[w], scores[l], seeds[w], seeds[l], None if cond is None else cond[w])


def pair_metrics(pairs: PairSet, possible: Optional[int] = None) -> dict[str, float]:
    """How many pairs and their mean score margin; for sampled pairs (`possible`: the most a sampling could keep,
    groups x k // 2) also the kept fraction and the mean winner and loser scores."""
    metrics = {"pairs": len(pairs), "score_margin_mean": float((pairs.score_w - pairs.score_l).mean())}
    if possible is not None:
        metrics.update({"kept_fraction": len(pairs) / possible, "score_winner_mean": float(pairs.score_w.mean()),
                        "score_loser_mean": float(pairs.score_l.mean())})
    return metrics


def read_labelled_pairs(path: Path | str, data_shape: list[int], num_classes: Optional[int] = None) -> PairSet:
    """Pairs from a JSONL file, one {"winner": ..., "loser": ..., "cond": optional int} per line, where winner and
    loser are nested lists or paths of .npy files (relative to the file's folder), in model range."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preferences.pairs_file not found: {path}")
    winners, losers, conds = [], [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: not a JSON object") from None
        if not isinstance(row, dict) or "winner" not in row or "loser" not in row:
            raise DataError(f"{path}:{lineno}: needs keys 'winner' and 'loser'")
        pair = [_load_array(row[key], path.parent, f"{path}:{lineno}: {key}") for key in ("winner", "loser")]
        for key, arr in zip(("winner", "loser"), pair):
            if list(arr.shape) != list(data_shape):
                raise DataError(f"{path}:{lineno}: {key} has shape {list(arr.shape)}, but the model's data shape "
                                f"is {list(data_shape)}")
        winners.append(pair[0])
        losers.append(pair[1])
        c = row.get("cond")
        if c is not None and (num_classes is None or not 0 <= int(c) <= num_classes):
            raise DataError(f"{path}:{lineno}: cond {c} is not a label of the model "
                            f"({'unconditional' if num_classes is None else f'0..{num_classes}'})")
        conds.append(num_classes if c is None and num_classes is not None else c)
    if not winners:
        raise DataError(f"{path} holds no pairs")
    n = len(winners)
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    seeds = torch.full((n,), -1, dtype=torch.int64)
    cond = torch.tensor(conds, dtype=torch.int64) if num_classes is not None else None
    return PairSet(torch.from_numpy(np.stack(winners)), torch.from_numpy(np.stack(losers)), nan, nan.clone(),
                   seeds, seeds.clone(), cond)


def _load_array(value: Any, base: Path, where: str) -> np.ndarray:
    if isinstance(value, str):
        file = base / value
        if not file.is_file():
            raise DataError(f"{where}: file not found: {file}")
        try:
            arr = np.load(file)
        except Exception as e:
            raise DataError(f"{where}: cannot read {file}: {e.__class__.__name__}") from None
    else:
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"{where}: not a numeric array") from None
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: contains non-finite values")
    return arr


def write_pair_shards(pairs: PairSet, out_dir: Path | str, *, pairs_per_shard: int = 2048,
                      pairs_per_record: int = 256, info: Optional[dict] = None) -> dict:
    """Write `pairs` as WebDataset shards into `out_dir` (must exist) plus manifest.json; returns the manifest."""
    out_dir = Path(out_dir)
    arrays = {"xw": pairs.x_w.numpy().astype(np.float32), "xl": pairs.x_l.numpy().astype(np.float32),
              "sw": pairs.score_w.numpy(), "sl": pairs.score_l.numpy(),
              "seedw": pairs.seed_w.numpy(), "seedl": pairs.seed_l.numpy(),
              "cls": None if pairs.cond is None else pairs.cond.numpy()}
    shards = write_array_shards(out_dir, "pairs", arrays, samples_per_shard=pairs_per_shard,
                                samples_per_record=pairs_per_record)
    margin = (pairs.score_w - pairs.score_l)
    manifest = {
        "format": "webdataset",
        "record_keys": sorted(f"{k}.npy" for k, v in arrays.items() if v is not None),
        "count": len(pairs),
        "shape": list(pairs.x_w.shape[1:]),
        "conditional": pairs.cond is not None,
        "shards": shards,
        "score_margin": {"min": _finite_or_none(margin.min()), "mean": _finite_or_none(margin.mean())},
        **(info or {}),
    }
    manifest["digest"] = tree_digest(out_dir)
    write_json(out_dir / PAIRS_MANIFEST, manifest)
    return manifest


def _finite_or_none(value: Tensor) -> Optional[float]:
    v = float(value)
    return v if math.isfinite(v) else None


def read_pair_shards(pair_dir: Path | str) -> tuple[PairSet, dict]:
    """Read every shard listed in the manifest back into one PairSet; returns (pairs, manifest)."""
    pair_dir = Path(pair_dir)
    if not (pair_dir / PAIRS_MANIFEST).is_file():
        raise DataError(f"no pairs manifest at {pair_dir / PAIRS_MANIFEST} (run `dvc repro preferences` first)")
    manifest = read_json(pair_dir / PAIRS_MANIFEST)
    col = {k: torch.from_numpy(v) for k, v in read_array_shards([pair_dir / n for n in manifest["shards"]]).items()}
    pairs = PairSet(col["xw"], col["xl"], col["sw"], col["sl"], col["seedw"], col["seedl"], col.get("cls"))
    if len(pairs) != manifest["count"]:
        raise DataError(f"{pair_dir}: manifest lists {manifest['count']} pairs, the shards hold {len(pairs)}")
    return pairs, manifest
