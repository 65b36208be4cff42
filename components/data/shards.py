"""Write a SourceData into WebDataset tar shards plus a manifest, and read shards back.

Layout: `<out>/{train,val}-%06d.tar` and `<out>/manifest.json`. One sample = `__key__`, `x.npy` (the array:
a 2-D point, a vector or a [C, H, W] image) and `cls` (its integer class, when labelled).
Shards are byte-reproducible (fixed tar mtime), so DVC sees identical outputs for identical params.
"""
from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from components.data.sources import SourceData
from components.errors import DataError
from components.io import read_json, tree_digest

SPLITS = ("train", "val")
MANIFEST = "manifest.json"


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic shuffled split; both parts non-empty."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val > n - 1:
        raise DataError(f"shard.val_fraction={val_fraction} leaves an empty split for {n} samples "
                        f"(val would have {n_val}); use more data or another fraction")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def to_model_range(x: np.ndarray, encoding: str) -> np.ndarray:
    """Stored values -> float32 model inputs (uint8 images map to [-1, 1])."""
    if encoding == "uint8":
        return x.astype(np.float32) / 127.5 - 1.0
    return x.astype(np.float32, copy=False)


def write_shards(data: SourceData, out_dir: Path, *, val_fraction: float, samples_per_shard: int,
                 min_shards: int, seed: int, progress: bool = True) -> dict:
    """Split, write both splits as shards into `out_dir` (which must exist), return the manifest dict."""
    import webdataset as wds

    n = len(data.x)
    train_idx, val_idx = data.fixed_split or split_indices(n, val_fraction, seed)
    splits_info = {}
    bar = tqdm(total=n, desc="writing shards", unit="sample", disable=not progress, mininterval=1.0)
    for split, idx in zip(SPLITS, (train_idx, val_idx)):
        per_shard = max(1, min(samples_per_shard, math.ceil(len(idx) / min_shards)))
        pattern = str(out_dir / f"{split}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=0.0) as sink:
            for i in idx:
                sample = {"__key__": f"{i:08d}", "x.npy": data.x[i]}
                if data.y is not None:
                    sample["cls"] = int(data.y[i])
                sink.write(sample)
                bar.update(1)
        shards = sorted(p.name for p in out_dir.glob(f"{split}-*.tar"))
        xs = to_model_range(data.x[idx], data.encoding)
        hist = None
        if data.y is not None:
            counts = np.bincount(data.y[idx], minlength=data.num_classes or 0)
            hist = {str(c): int(k) for c, k in enumerate(counts)}
        splits_info[split] = {
            "count": int(len(idx)),
            "shards": shards,
            "samples_per_shard": per_shard,
            "class_histogram": hist,
            "sigma_data": float(xs.std()),
            "mean": float(xs.mean()),
        }
    bar.close()
    return {
        "format": "webdataset",
        "sample_keys": ["x.npy", "cls"] if data.y is not None else ["x.npy"],
        "shape": list(data.x.shape[1:]),
        "dtype": str(data.x.dtype),
        "encoding": data.encoding,
        "kind": "image" if data.x.ndim == 4 else "points",
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "source": data.description,
        "splits": splits_info,
        "sigma_data": splits_info["train"]["sigma_data"],
        "digest": tree_digest(out_dir),
    }


def read_shard_manifest(shard_dir: Path | str) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"no shard manifest at {path} (run the shard stage first: dvc repro shard)")
    return read_json(path)


def shard_paths(shard_dir: Path | str, split: str) -> list[Path]:
    manifest = read_shard_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise DataError(f"unknown split '{split}' (have {', '.join(manifest['splits'])})")
    paths = [Path(shard_dir) / s for s in manifest["splits"][split]["shards"]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"shard files listed in the manifest are missing: {', '.join(missing[:3])}")
    return paths


def read_split(shard_dir: Path | str, split: str, limit: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """All samples of a split, in shard order, as float32 model-range arrays (for evaluation references).

    Reads the tars directly (no shuffling, no worker splitting), so every caller sees the same order.
    """
    manifest = read_shard_manifest(shard_dir)
    xs, ys = [], []
    for path in shard_paths(shard_dir, split):
        try:
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".x.npy"):
                        xs.append(np.load(io.BytesIO(tar.extractfile(m).read())))
                    elif m.name.endswith(".cls"):
                        ys.append(int(tar.extractfile(m).read()))
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(f"corrupt shard {path}: {e.__class__.__name__}: {e}") from None
        if limit is not None and len(xs) >= limit:
            break
    x = to_model_range(np.stack(xs[:limit]), manifest["encoding"])
    y = np.asarray(ys[:limit], dtype=np.int64) if ys else None
    return x, y
